"""A trained run used the way users already work: reload + plain ``generate()``, merged LoRA export (loaded with
peft blocked), checkpoints that load in evaluate.py / summarize.py / export.py, ``--load_best_model_at_end``.

Two real training runs (``train_full.py`` and ``train_lora.py --merge_lora``, quick-start model, 30 steps, a
checkpoint and an evaluation every 10) are shared by the module. Their validation "summaries" are made of words
that occur only in dialogues, never in training summaries: the more the model learns to write summaries, the less
likely those words become, so the validation loss rises and the best checkpoint is not the last one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import HANG_TIMEOUT_S, REPO, run_script, subprocess_env
from safetensors.torch import load_file

from dialogsum.config import parse_config
from dialogsum.errors import ConfigError

STEPS = ["--max_train_steps", "30", "--checkpointing_steps", "10", "--eval_steps", "10", "--load_best_model_at_end"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> dict[str, Path]:
    model_dir, data_dir = quickstart_assets
    root = tmp_path_factory.mktemp("ship")
    rows = _rows(data_dir / "validation.jsonl")[:16]
    unlike = [{**row, "summary": "Sure, what do you need? Oh no. When was that?"} for row in rows]
    validation = root / "validation_unlike_summaries.jsonl"
    validation.write_text("".join(json.dumps(row) + "\n" for row in unlike))
    found = {}
    for method, extra in (("full", ["--learning_rate", "3e-3"]), ("lora", ["--learning_rate", "1e-2", "--merge_lora"])):
        out = root / method
        cmd = [
            sys.executable, str(REPO / "scripts" / f"train_{method}.py"), "--output_dir", str(out), *STEPS, *extra,
            "--model_name_or_path", str(model_dir), "--train_file", str(data_dir / "train.jsonl"),
            "--validation_file", str(validation), "--test_file", str(data_dir / "test.jsonl"),
            "--max_test_samples", "16", "--per_device_train_batch_size", "16", "--max_source_length", "96",
            "--max_target_length", "32", "--max_new_tokens", "32", "--lora_target_modules", "q", "k", "v", "o",
            "--report_to", "none",
        ]  # fmt: skip
        proc = run_script(cmd, env=subprocess_env(OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[method] = out
    return found


def _generate_plainly(model: torch.nn.Module, tokenizer, run: Path) -> list[str]:
    """What a user writes: the run's prompt, truncation to its source length, a plain ``generate()``, decode."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    summaries = []
    for row in _rows(run / "predictions.jsonl"):
        prompt = config["prompt_template"].format(dialogue=row["dialogue"])
        inputs = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=config["max_source_length"])
        with torch.no_grad():
            ids = model.generate(**inputs)[0]
        summaries.append(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip())
    return summaries


def _predictions(run: Path) -> list[str]:
    return [row["prediction"] for row in _rows(run / "predictions.jsonl")]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_generation_settings_travel_with_the_model(method: str, runs: dict[str, Path], one_thread) -> None:
    """full: from_pretrained(out); LoRA: PeftModel.from_pretrained(base, out), with the adapter's generation
    config on the base (peft does not read it): a plain generate() gives predictions.jsonl exactly."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    out = runs[method]
    saved = json.loads((out / "generation_config.json").read_text())
    assert (saved["max_new_tokens"], saved["num_beams"], saved["do_sample"]) == (32, 1, False)
    if method == "full":
        model = AutoModelForSeq2SeqLM.from_pretrained(str(out))
    else:
        from peft import PeftModel

        base = AutoModelForSeq2SeqLM.from_pretrained(
            json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
        base.generation_config = GenerationConfig.from_pretrained(str(out))
        model = PeftModel.from_pretrained(base, str(out))
    model.eval()
    plain = _generate_plainly(model, AutoTokenizer.from_pretrained(str(out)), out)
    predictions = _predictions(out)
    assert plain == predictions
    # without the saved settings generate() stops at transformers' default of 20 tokens: the test can tell
    assert max(len(p.split()) for p in predictions) > 20


def test_merged_export_loads_without_peft_and_predicts_the_same(runs: dict[str, Path], tmp_path: Path) -> None:
    merged = runs["lora"] / "merged"
    files = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert "adapter_config.json" not in files and "config.yaml" in files
    assert "library_name: transformers" in (merged / "README.md").read_text()
    script = f"""
import json, sys
sys.modules["peft"] = None  # import peft now fails: the folder must load with transformers alone
import torch, yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
torch.set_num_threads(1)
model = AutoModelForSeq2SeqLM.from_pretrained({str(merged)!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(merged)!r})
config = yaml.safe_load(open({str(merged / "config.yaml")!r}))
rows = [json.loads(x) for x in open({str(runs["lora"] / "predictions.jsonl")!r})]
out = []
for row in rows:
    inputs = tokenizer(config["prompt_template"].format(dialogue=row["dialogue"]), return_tensors="pt",
                       truncation=True, max_length=config["max_source_length"])
    ids = model.generate(**inputs)[0]
    out.append(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip())
try:
    import peft  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({{"predictions": out, "peft_blocked": blocked}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
                          env=subprocess_env(OMP_NUM_THREADS="1"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peft_blocked"]
    assert result["predictions"] == _predictions(runs["lora"])  # base + adapter, as evaluated in the run


def test_checkpoints_hold_a_loadable_model_and_the_best_one_is_the_final_model(runs: dict[str, Path]) -> None:
    for method, weights in (("full", "model.safetensors"), ("lora", "adapter_model.safetensors")):
        out = runs[method]
        metrics = json.loads((out / "metrics.json").read_text())
        best = metrics["best_step"]
        assert metrics["final_model_step"] == best and metrics["train_steps"] == 30
        assert best in (10, 20), metrics  # see the module docstring: the validation loss rises
        for step in (10, 20, 30):
            folder = out / f"checkpoint-{step}"
            assert {weights, "generation_config.json", "tokenizer.json", "trainer_state.json"} <= {
                p.name for p in folder.iterdir()
            }
        final, kept = load_file(str(out / weights)), load_file(str(out / f"checkpoint-{best}" / weights))
        assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
        if method == "full":  # the weights are stored once per checkpoint, in the loadable form
            assert not (out / "checkpoint-10" / "pytorch_model.bin").exists()
            assert json.loads((out / "checkpoint-10" / "trainable_only.json").read_text()) == {
                "0": "loadable model.safetensors"
            }


def test_evaluate_summarize_and_export_take_a_checkpoint_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    full, lora = runs["full"], runs["lora"]
    best = json.loads((full / "metrics.json").read_text())["best_step"]
    test_file = Path(yaml.safe_load((full / "config.yaml").read_text())["test_file"])
    env = subprocess_env(OMP_NUM_THREADS="1")
    evaluate = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--test_file", str(test_file),
                "--max_test_samples", "16", "--max_new_tokens", "32"]  # fmt: skip
    proc = run_script(
        [*evaluate, "--model_name_or_path", str(full / f"checkpoint-{best}"), "--output_dir", str(tmp_path / "e1")],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the best checkpoint is the final model: the same predictions as the run's own evaluation
    assert _predictions(tmp_path / "e1") == _predictions(full)

    proc = run_script(
        [*evaluate, "--adapter_path", str(lora / "checkpoint-20"), "--output_dir", str(tmp_path / "e2")], env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    adapter_mb = (lora / "checkpoint-20" / "adapter_model.safetensors").stat().st_size / 1e6
    assert metrics["method"] == "lora" and metrics["checkpoint_size_mb"] == pytest.approx(adapter_mb, abs=1e-3)

    dialogue = _rows(test_file)[0]["dialogue"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), "--model_name_or_path", str(full / "checkpoint-10"),
         "--max_new_tokens", "32"],
        input=dialogue, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["summary"]

    export = [sys.executable, str(REPO / "scripts" / "export.py"), "--adapter_path", str(lora / "checkpoint-20")]
    proc = run_script([*export, "--output_dir", str(tmp_path / "merged20")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "merged20" / "model.safetensors").is_file()
    assert "library_name: transformers" in (tmp_path / "merged20" / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output_dir", "{lora}/inside"], "is inside the --adapter_path"),
        (["--output_dir", "{tmp}/merged20"], "is not empty and is not a run folder (no .dialogsum-manifest.json"),
        (["--output_dir", "{tmp}/x", "--adapter_path", "{full}"], "is not a LoRA adapter folder"),
        (["--output_dir", "{tmp}/x", "--hub_model_id", "me/x"], "settings of --push_to_hub"),
        (["--adapter_path", "{lora}"], "--output_dir is required"),
    ],
)
def test_export_refuses_bad_input_in_one_line(args: list[str], message: str, runs: dict[str, Path], tmp_path: Path):
    (tmp_path / "merged20").mkdir()
    (tmp_path / "merged20" / "keep.txt").write_text("x")
    values = {"lora": runs["lora"], "full": runs["full"], "tmp": tmp_path}
    args = [a.format(**values) for a in args]
    if "--adapter_path" not in args:
        args = ["--adapter_path", str(runs["lora"]), *args]
    proc = run_script([sys.executable, str(REPO / "scripts" / "export.py"), *args])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "merged20" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    ("method", "args", "message"),
    [
        (
            "full",
            ["--load_best_model_at_end", "--checkpointing_steps", "5"],
            "--load_best_model_at_end needs --eval_steps",
        ),
        ("full", ["--load_best_model_at_end", "--eval_steps", "5"], "needs --eval_steps (to find"),
        ("full", ["--merge_lora"], "--merge_lora merges an adapter: use it with scripts/train_lora.py or train_ia3.py"),
        ("lora", ["--merge_lora", "--do_train", "false"], "--merge_lora needs --do_train"),
        ("lora", ["--hub_model_id", "a/b/c", "--push_to_hub"], "--hub_model_id must be 'name' or 'namespace/name'"),
        ("lora", ["--hub_private_repo"], "settings of --push_to_hub"),
        ("lora", ["--source_prefix", "summarize: "], "--source_prefix is --prompt_template here"),
        ("lora", ["--val_max_target_length", "64"], "--val_max_target_length is --max_new_tokens here"),
        ("lora", ["--with_tracking"], "--with_tracking is --report_to here"),
    ],
)
def test_flag_combinations_and_renamed_example_flags_are_refused_early(
    method: str, args: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([*args, "--output_dir", "unused"], method)
    assert message in str(info.value)


def test_secrets_never_reach_the_saved_config_or_the_command_line() -> None:
    cfg = parse_config(["--output_dir", "o", "--push_to_hub", "--hub_token", "hf_secret", "--hub_model_id", "a/b"],
                       "lora")  # fmt: skip
    assert cfg.hub.hub_token == "hf_secret"
    assert "hub_token" not in cfg.to_dict() and "hf_secret" not in yaml.safe_dump(cfg.to_dict())
    assert "hf_secret" not in (cfg.command or "") and "--hub_token '***'" in (cfg.command or "")
