"""Both training scripts as real ``accelerate launch`` subprocesses: quick start, promised files, learning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, accelerate_launch, run_script, subprocess_env
from safetensors.torch import load_file

METRIC_KEYS = {
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "num_eval_examples",
    "train_loss",
    "train_runtime_s",
    "train_samples_per_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "checkpoint_size_mb",
    "method",
    "model_name_or_path",
    "generation",
    "num_processes",
    "distributed_type",
}
PREDICTION_KEYS = {"id", "dialogue", "reference", "references", "prediction"}


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The README's quick start, for both scripts, exactly as a user runs it."""
    root = tmp_path_factory.mktemp("quickstart_runs")
    runs = {}
    for method in ("full", "lora"):
        out = root / method
        proc = accelerate_launch("cpu.yaml", f"train_{method}.py", ["--quickstart", "--output_dir", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[method] = out
    return runs


def _read(out: Path) -> tuple[dict, list[dict], list[dict]]:
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    history = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    return metrics, predictions, history


@pytest.mark.parametrize("method", ["full", "lora"])
def test_quickstart_writes_every_promised_file(method: str, quickstart_runs: dict[str, Path]) -> None:
    out = quickstart_runs[method]
    files = {p.name for p in out.iterdir()}
    common = {
        "metrics.json",
        "predictions.jsonl",
        "config.yaml",
        "log_history.jsonl",
        "parameters.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "report.md",
    }
    weights = (
        {"model.safetensors", "config.json"}
        if method == "full"
        else {"adapter_model.safetensors", "adapter_config.json"}
    )
    assert common | weights <= files
    if method == "lora":
        assert "model.safetensors" not in files
        assert all(t.numel() > 0 for t in load_file(str(out / "adapter_model.safetensors")).values())
    metrics, predictions, history = _read(out)
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["method"] == method
    assert metrics["num_eval_examples"] == len(predictions) == 40
    assert metrics["generation"]["max_new_tokens"] == 32 and metrics["generation"]["num_beams"] == 1
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert metrics["num_processes"] == 1 and metrics["distributed_type"] == "NO"
    assert metrics["checkpoint_size_mb"] > 0 and metrics["train_tokens_per_s"] > 0
    assert all(PREDICTION_KEYS <= p.keys() for p in predictions)
    assert len({p["id"] for p in predictions}) == 40
    if method == "lora":
        assert 0 < metrics["trainable_percent"] < 100 and metrics["trainable_params"] < metrics["total_params"]
    else:
        assert metrics["trainable_params"] == metrics["total_params"]
    steps = [e for e in history if "loss" in e]
    assert steps[-1]["step"] == metrics["train_steps"] == 180
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s"} <= steps[0].keys()


@pytest.mark.parametrize(("method", "min_rouge"), [("full", 0.9), ("lora", 0.5)])
def test_quickstart_learns_the_synthetic_mapping(
    method: str, min_rouge: float, quickstart_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = quickstart_runs[method]
    metrics, predictions, history = _read(out)
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0] / 5  # loss falls clearly
    # the untrained model, evaluated the same way (zero-shot baseline), is far below
    base = tmp_path / "untrained"
    proc = run_script(
        [
            sys.executable,
            str(REPO / "scripts" / "train_full.py"),
            "--quickstart",
            "--do_train",
            "false",
            "--output_dir",
            str(base),
        ],
        env=subprocess_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    untrained = json.loads((base / "metrics.json").read_text())
    assert untrained["rougeL"] < 0.1
    assert metrics["rougeL"] > min_rouge > untrained["rougeL"] + 0.4


def test_local_model_and_dialogsum_jsonl(tmp_path: Path, flan_t5_base_dir: Path, dialogsum_dev: Path) -> None:
    """A tiny T5 with the real FLAN-T5 tokenizer, trained on real DialogSum rows from local files."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from dialogsum.modeling import untie_lm_head

    tokenizer = AutoTokenizer.from_pretrained(str(flan_t5_base_dir))
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)
    model.save_pretrained(str(tmp_path / "tiny"))
    tokenizer.save_pretrained(str(tmp_path / "tiny"))
    for method in ("full", "lora"):
        out = tmp_path / method
        proc = accelerate_launch(
            "cpu.yaml",
            f"train_{method}.py",
            [
                "--model_name_or_path",
                str(tmp_path / "tiny"),
                "--train_file",
                str(dialogsum_dev),
                "--test_file",
                str(dialogsum_dev),
                "--max_train_samples",
                "32",
                "--max_test_samples",
                "6",
                "--max_train_steps",
                "3",
                "--per_device_train_batch_size",
                "8",
                "--max_new_tokens",
                "8",
                "--report_to",
                "none",
                "--output_dir",
                str(out),
            ],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_eval_examples"] == 6 and metrics["train_steps"] == 3
        predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert [p["id"] for p in predictions] == [
            json.loads(x)["fname"] for x in dialogsum_dev.read_text().splitlines()[:6]
        ]
        assert "effective batch: 8 per device x 1 accumulation x 1 process(es) = 8" in proc.stderr
