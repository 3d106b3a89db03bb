"""evaluate.py: official vs flattened test files, two processes, LoRA adapters, bad input."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, run_script, subprocess_env

from dialogsum.config import LoraArguments
from dialogsum.errors import UserError
from dialogsum.inference import parse_evaluate_args, run_evaluation
from dialogsum.quickstart import build_tiny_t5

SCRIPT = REPO / "scripts" / "evaluate.py"
NUM_DIALOGUES = 7  # odd: with 2 processes one of them gets a filler batch that must be thrown away
FLAGS = ["--max_new_tokens", "24", "--per_device_eval_batch_size", "2", "--max_source_length", "96"]


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def assets(
    tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path], trained_tiny_model: Path
) -> dict[str, Path]:
    """A briefly trained tiny T5, and the same test dialogues as an official-format and a flattened file."""
    root = tmp_path_factory.mktemp("evaluate")
    model_dir, data_dir = quickstart_assets
    trained = trained_tiny_model

    test_rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()][:NUM_DIALOGUES]
    official, flattened = [], []
    for row in test_rows:
        references = [row["summary"], row["summary"].replace(" on ", " this "), f"A talk about the {row['topic']}."]
        official.append(
            {
                "fname": row["fname"],
                "dialogue": row["dialogue"],
                **{f"summary{k}": ref for k, ref in enumerate(references, start=1)},
                **{f"topic{k}": row["topic"] for k in range(1, 4)},
            }
        )
        # The hub's form: one row per (dialogue, reference), the dialogue text repeated.
        flattened += [
            {"id": f"{row['fname']}_{k}", "dialogue": row["dialogue"], "summary": ref, "topic": row["topic"]}
            for k, ref in enumerate(references, start=1)
        ]
    (root / "official.jsonl").write_text("".join(json.dumps(r) + "\n" for r in official))
    with (root / "flattened.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["id", "dialogue", "summary", "topic"])
        writer.writeheader()
        writer.writerows(flattened)
    return {"root": root, "model": trained, "official": root / "official.jsonl", "flattened": root / "flattened.csv"}


def evaluate(assets: dict[str, Path], test_file: Path, output_dir: Path, *extra: str) -> dict:
    argv = [
        "--model_name_or_path",
        str(assets["model"]),
        "--test_file",
        str(test_file),
        "--output_dir",
        str(output_dir),
        *FLAGS,
        *extra,
    ]
    return run_evaluation(parse_evaluate_args(argv))


def read_predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def official_run(assets: dict[str, Path]) -> Path:
    out = assets["root"] / "official_run"
    evaluate(assets, assets["official"], out)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_official_and_flattened_files_give_the_same_figures(
    assets: dict[str, Path], official_run: Path, tmp_path: Path
) -> None:
    official = json.loads((official_run / "metrics.json").read_text())
    flattened = evaluate(assets, assets["flattened"], tmp_path / "flat", "--id_column", "id")
    # One generation per unique dialogue: 7 dialogues, 21 references, from 7 rows or from 21 rows.
    for metrics in (official, flattened):
        assert metrics["num_eval_examples"] == NUM_DIALOGUES and metrics["num_references"] == 3 * NUM_DIALOGUES
        assert metrics["headline_protocol"] == "multi_reference"
        assert metrics["trainable_params"] == 0 and metrics["num_processes"] == 1
    for protocol in ("multi_reference", "mean_over_references", "flat"):
        assert flattened[protocol] == pytest.approx(official[protocol], abs=1e-12)
    # the same dialogues and references, whichever file layout they came from
    assert official["eval_set_fingerprint"] == flattened["eval_set_fingerprint"]
    assert official["eval_set_fingerprint"].startswith("sha256:")
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert official[key] == official["multi_reference"][key]
    # The model writes template words: the figures are not trivially zero, and best-match beats the mean.
    assert 0.1 < official["rouge1"] < 1.0
    assert official["rouge1"] > official["mean_over_references"]["rouge1"]

    official_rows, flat_rows = read_predictions(official_run), read_predictions(tmp_path / "flat")
    assert [r["prediction"] for r in official_rows] == [r["prediction"] for r in flat_rows]
    assert [r["references"] for r in official_rows] == [r["references"] for r in flat_rows]
    assert len(official_rows) == NUM_DIALOGUES and all(len(r["references"]) == 3 for r in official_rows)
    written = ["config.yaml", "metrics.json", "predictions.jsonl"]
    assert sorted(p.name for p in official_run.iterdir()) == [".dialogsum-manifest.json", *written]
    assert json.loads((official_run / ".dialogsum-manifest.json").read_text())["entries"] == written


@pytest.mark.slow
def test_two_processes_score_every_dialogue_once(assets: dict[str, Path], official_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(SCRIPT),
        "--model_name_or_path",
        str(assets["model"]),
        "--test_file",
        str(assets["official"]),
        "--output_dir",
        str(out),
        *FLAGS,
    ]
    result = run_script(command, env=subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    rows = read_predictions(out)
    # 7 dialogues in batches of 2 over 2 processes: 4 batches, so one process runs a filler batch.
    assert [r["id"] for r in rows] == [r["id"] for r in read_predictions(official_run)]
    assert len({r["id"] for r in rows}) == NUM_DIALOGUES
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in read_predictions(official_run)]
    single = json.loads((official_run / "metrics.json").read_text())
    for protocol in ("multi_reference", "mean_over_references", "flat"):
        assert metrics[protocol] == pytest.approx(single[protocol], abs=1e-12)


def test_overwrite_replaces_the_previous_results_only(assets: dict[str, Path], tmp_path: Path) -> None:
    """--overwrite_output_dir: a previous run's files (results, checkpoints, card) go; a user's own file stays."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "report.md").write_text("an older run")
    (out / "README.md").write_text("an older card")
    (out / ".dialogsum-manifest.json").write_text('{"entries": ["checkpoint-3", "report.md", "README.md"]}')
    (out / "notes.txt").write_text("mine")  # not in the manifest: a person's
    metrics = evaluate(assets, assets["official"], out, "--overwrite_output_dir")
    names = sorted(p.name for p in out.iterdir())
    assert names == [".dialogsum-manifest.json", "config.yaml", "metrics.json", "notes.txt", "predictions.jsonl"]
    manifest = json.loads((out / ".dialogsum-manifest.json").read_text())
    assert manifest["entries"] == ["config.yaml", "metrics.json", "predictions.jsonl"]
    assert json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_zero3_loads_the_pretrained_weights(assets: dict[str, Path], official_run: Path, tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 with sharded construction (zero3_init_flag: true), 2 CPU processes: the model is loaded
    whole after the Accelerator exists (modeling.whole_model_loading, as in training) and sharded by prepare, so
    the predictions are the single process's (sharded construction alone would drop the pretrained values)."""
    pytest.importorskip("deepspeed")
    from test_distributed import TORCH_EXTENSIONS_DIR

    config = yaml.safe_load((REPO / "accelerate_configs" / "deepspeed_zero3.yaml").read_text())
    config["deepspeed_config"]["zero3_init_flag"] = True
    config_file = tmp_path / "zero3_init.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "zero3"
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)),
        *("--num_processes", "2", "--mixed_precision", "no", str(SCRIPT)),
        *("--model_name_or_path", str(assets["model"]), "--test_file", str(assets["official"])),
        *("--output_dir", str(out), *FLAGS),
    ]
    env = subprocess_env(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR)
    result = run_script(command, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed_type"] == "DEEPSPEED" and metrics["num_processes"] == 2
    assert [r["prediction"] for r in read_predictions(out)] == [r["prediction"] for r in read_predictions(official_run)]


def _save_adapter(model_dir: Path, adapter_dir: Path) -> None:
    from dialogsum.modeling import apply_lora, load_model

    model = apply_lora(load_model(str(model_dir)), LoraArguments(lora_r=4, lora_alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the adapter an effect
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(str(adapter_dir))


def test_lora_adapter_evaluation(assets: dict[str, Path], official_run: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    _save_adapter(assets["model"], adapter)
    # The training run's prompt is picked up from the config.yaml saved beside the adapter.
    prompt = "Dialogue:\n{dialogue}\nSummary:"
    (adapter / "config.yaml").write_text(yaml.safe_dump({"method": "lora", "prompt_template": prompt}))
    # No --model_name_or_path: the adapter's recorded base model is used.
    argv = [
        "--adapter_path",
        str(adapter),
        "--test_file",
        str(assets["official"]),
        "--output_dir",
        str(tmp_path / "out"),
        *FLAGS,
    ]
    metrics = run_evaluation(parse_evaluate_args(argv))
    assert metrics["trainable_params"] == 0 and metrics["trainable_percent"] == 0.0
    assert metrics["method"] == "lora" and metrics["adapter_path"] == str(adapter)
    assert metrics["model_name_or_path"] == str(assets["model"])
    assert 0 < metrics["checkpoint_size_mb"] < 0.1  # the adapter's size, not the model's
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["prompt_template"] == prompt
    base_rows = read_predictions(official_run)
    assert [r["prediction"] for r in read_predictions(tmp_path / "out")] != [r["prediction"] for r in base_rows]


def test_adapter_for_another_base_model_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    _save_adapter(assets["model"], adapter)
    wider = build_tiny_t5(assets["model"], tmp_path / "wider", d_model=96)
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(wider),
        "--adapter_path",
        str(adapter),
        "--test_file",
        str(assets["official"]),
        "--output_dir",
        str(out),
    ]
    result = run_script([sys.executable, str(SCRIPT), *argv], env=subprocess_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: adapter ") and "d_model 64 vs 96" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_bad_inputs(assets: dict[str, Path], tmp_path: Path) -> None:
    base = ["--test_file", str(assets["official"])]
    adapter = tmp_path / "adapter"
    _save_adapter(assets["model"], adapter)
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.json").write_text("{}")
    cases = [
        (
            ["--model_name_or_path", str(adapter), *base, "--output_dir", str(tmp_path / "a")],
            "is a LoRA adapter, not a model: pass it as --adapter_path",
        ),
        (
            [
                "--model_name_or_path",
                str(assets["model"]),
                "--adapter_path",
                str(assets["model"]),
                *base,
                "--output_dir",
                str(tmp_path / "b"),
            ],
            "not a LoRA adapter folder (no adapter_config.json) (it holds a full",
        ),
        (
            [
                "--model_name_or_path",
                str(assets["model"]),
                "--test_file",
                str(tmp_path / "missing.jsonl"),
                "--output_dir",
                str(tmp_path / "c"),
            ],
            "data file not found",
        ),
        (
            ["--model_name_or_path", str(assets["model"]), *base, "--output_dir", str(assets["root"])],
            "--output_dir {} contains the --test_file".format(assets["root"]),
        ),
        (["--model_name_or_path", str(assets["model"]), *base, "--output_dir", str(used)], "is not empty"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as info:
            run_evaluation(parse_evaluate_args(argv))
        assert "--resume_from_checkpoint" not in str(info.value)  # evaluate.py does not take it
    for folder in ("a", "b", "c"):
        assert not (tmp_path / folder).exists()
