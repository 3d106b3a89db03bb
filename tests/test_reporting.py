"""Run report (Markdown + PNG plots) and model card, from real run files; the card's loading code is run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dialogsum.config import build_config
from dialogsum.model_card import write_model_card
from dialogsum.report import write_run_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "method": "lora",
    "model_name_or_path": "google/flan-t5-base",
    "rouge1": 0.4731,
    "rouge2": 0.2012,
    "rougeL": 0.3977,
    "rougeLsum": 0.4001,
    "multi_reference": {"rouge1": 0.4731, "rouge2": 0.2012, "rougeL": 0.3977, "rougeLsum": 0.4001},
    "mean_over_references": {"rouge1": 0.4355, "rouge2": 0.1788, "rougeL": 0.3611, "rougeLsum": 0.3650},
    "flat": {"rouge1": 0.4355, "rouge2": 0.1788, "rougeL": 0.3611, "rougeLsum": 0.3650},
    "headline_protocol": "multi_reference",
    "num_examples": 500,
    "num_references": 1500,
    "num_eval_examples": 500,
    "generation": {"max_new_tokens": 128, "num_beams": 1},
    "eval_split": "test",
    "train_loss": 1.234,
    "train_runtime_s": 5400.0,
    "train_samples_per_s": 2.3,
    "train_tokens_per_s": 612.4,
    "train_steps": 1558,
    "trainable_params": 3_538_944,
    "total_params": 251_116_800,
    "trainable_percent": 1.4093,
    "checkpoint_size_mb": 13.5,
    "peak_memory_mb": 9800.0,
    "learning_rate": 1e-3,
    "num_processes": 2,
    "distributed_type": "MULTI_CPU",
    "mixed_precision": "bf16",
}


def _history() -> list[dict]:
    rows = []
    for step in range(10, 101, 10):
        rows.append(
            {
                "step": step,
                "epoch": step / 100,
                "loss": 3.0 / (1 + step / 25),
                "learning_rate": 1e-3 * (1 - step / 100),
                "grad_norm": 2.0 - step / 100,
                "tokens_per_s": 600.0 + step,
                "samples_per_s": 2.0,
                "peak_memory_mb": 9000.0 + step,
            }
        )
        if step % 50 == 0:
            rows.append(
                {"step": step, "eval_loss": 2.0 - step / 200, "eval_rouge1": 0.40 + step / 2000, "eval_rougeL": 0.33}
            )
    return rows


def _write_run(out: Path, method: str = "lora", model: str = "google/flan-t5-base") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**METRICS, "method": method, "model_name_or_path": model}
    cfg = build_config(method, {"output_dir": str(out), "model_name_or_path": model, "run_name": f"{method}-demo"})
    cfg.save(out / "config.yaml")
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "parameters.json").write_text(
        json.dumps({k: METRICS[k] for k in ("trainable_params", "total_params", "trainable_percent")})
    )
    (out / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _history()))
    rows = [
        {
            "id": f"test_{i}",
            "dialogue": "#Person1#: Could you pass the salt?\n#Person2#: Here you are.",
            "reference": "#Person1# asks #Person2# for the salt.",
            "references": ["#Person1# asks #Person2# for the salt."],
            "prediction": "#Person1# asks for the salt | pepper.",
        }
        for i in range(5)
    ]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return metrics


def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 8_000, f"{path} is only {len(data)} bytes"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 400 and height >= 250, (path, width, height)
    return width, height


def _front_matter(card: str) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", card, flags=re.S)
    assert match, "model card has no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


# ------------------------------------------------------------------------------------------- run report


def test_run_report_has_every_section_and_valid_plots(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _write_run(out)
    report = write_run_report(out)
    assert report == out / "report.md"
    text = report.read_text(encoding="utf-8")

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(images) == {f"plots/{n}.png" for n in ("rouge", "training", "eval", "throughput", "resources")}
    for image in images:
        assert not Path(image).is_absolute()
        _check_png(out / image)  # resolves relative to the report

    assert text.startswith("# Run report: lora-demo")
    assert "LoRA fine-tuning of `google/flan-t5-base` on `knkarthick/dialogsum`" in text
    # ROUGE x 100 per protocol, headline marked
    assert "| **multi_reference** (headline) | 47.31 | 20.12 | 39.77 | 40.01 |" in text
    assert "| flat | 43.55 | 17.88 | 36.11 | 36.50 |" in text
    assert "test split (500 dialogues, 1500 references)" in text
    # eval during training table: step, loss, ROUGE points (only the columns that were logged)
    assert "| step | validation loss | ROUGE-1 | ROUGE-L |" in text and "| 50 | 1.7500 | 42.50 | 33.00 |" in text
    # resources and hyperparameters
    # sizes in MB = 10^6 bytes, the unit of every *_mb key
    assert "3,538,944 (1.41% of 251,116,800)" in text and "| checkpoint size | 13.5 MB |" in text
    assert "| peak memory | 9.80 GB |" in text
    assert "1 h 30 min" in text and "612 real tokens/s" in text and "2 (MULTI_CPU, precision bf16)" in text
    assert "8 per device × 1 accumulation × 2 process(es) = 16 per optimizer step" in text
    assert "r=32, alpha=32, dropout=0.05, targets=q, v" in text
    # sample predictions, with a Markdown-safe pipe
    assert text.count("**test_") == 3 and "salt \\| pepper" in text
    assert "[`metrics.json`](metrics.json)" in text
    assert not list(out.glob(".*.tmp")) and not list((out / "plots").glob(".*.tmp"))


def test_run_report_tolerates_missing_optional_files(tmp_path: Path) -> None:
    out = tmp_path / "eval-only"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"method": "full", "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2}))
    text = write_run_report(out).read_text()
    assert "| – | 30.00 | 10.00 | 20.00 | – |" in text
    assert "No training steps were logged" in text
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["rouge.png"]
    _check_png(out / "plots" / "rouge.png")

    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_run_report(empty).read_text()
    assert "No evaluation results" in text and "No resource figures recorded" in text
    with pytest.raises(FileNotFoundError):
        write_run_report(tmp_path / "missing")


# ------------------------------------------------------------------------------------------- model card


def test_lora_model_card_metadata_and_sections(tmp_path: Path) -> None:
    out = tmp_path / "lora-out"
    metrics = _write_run(out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    card = write_model_card(out, metrics, config)
    assert card == out / "README.md"
    meta, body = _front_matter(card.read_text(encoding="utf-8"))

    assert meta["base_model"] == "google/flan-t5-base"
    assert meta["library_name"] == "peft"
    assert meta["datasets"] == ["knkarthick/dialogsum"]
    assert {"summarization", "lora", "peft", "flan-t5"} <= set(meta["tags"])
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "DialogSum", "split": "test", "type": "knkarthick/dialogsum"}
    assert {m["name"]: m["value"] for m in result["metrics"]} == {
        "ROUGE-1": 47.31,
        "ROUGE-2": 20.12,
        "ROUGE-L": 39.77,
        "ROUGE-Lsum": 40.01,
    }

    assert "a LoRA adapter for [`google/flan-t5-base`](https://huggingface.co/google/flan-t5-base)" in body
    assert "| learning rate | 0.001 |" in body
    assert "r=32, alpha=32, dropout=0.05, targets=q, v" in body
    assert "**multi_reference** (headline, used in the metadata above)" in body
    assert "| mean_over_references | 43.55 | 17.88 | 36.11 | 36.50 |" in body
    assert "CC BY-NC-SA 4.0" in body and "## Intended use and limitations" in body
    assert "PeftModel.from_pretrained(base, adapter_dir)" in body
    assert 'AutoModelForSeq2SeqLM.from_pretrained("google/flan-t5-base")' in body


def test_full_model_card_with_local_base_model(tmp_path: Path) -> None:
    out = tmp_path / "full-out"
    local_base = tmp_path / "my-base"
    local_base.mkdir()
    metrics = _write_run(out, method="full", model=str(local_base))
    config = yaml.safe_load((out / "config.yaml").read_text())
    meta, body = _front_matter(write_model_card(out, metrics, config).read_text())
    assert "base_model" not in meta  # a local folder is not a hub id
    assert meta["library_name"] == "transformers" and "full-fine-tuning" in meta["tags"]
    assert f"a fully fine-tuned version of [`{local_base}`]" in body
    assert "| method | full fine-tuning |" in body and "LoRA" not in body.split("## Evaluation")[0]
    assert "AutoModelForSeq2SeqLM.from_pretrained(model_dir)" in body and "PeftModel" not in body


def test_model_card_metadata_parses_with_huggingface_hub(tmp_path: Path) -> None:
    """peft's save_pretrained parses an existing README.md: a bad model-index broke re-runs into the same folder."""
    from huggingface_hub import ModelCard

    out = tmp_path / "local-data"
    metrics = _write_run(out, method="lora", model=str(tmp_path / "base"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    card = ModelCard.load(str(write_model_card(out, metrics, config)))
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["ROUGE-1"] == round(100 * metrics["rouge1"], 2)
    assert all(r.dataset_type for r in card.data.eval_results)


def _python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)


def test_model_card_loading_code_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The card's snippet loads a real (tiny) full model and a real LoRA adapter and generates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    full_out = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full_out)
    # a run saves its generation settings with the model; the card's snippet relies on them
    generation = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).generation_config
    generation.max_new_tokens = 5
    generation.save_pretrained(full_out)
    config = {"method": "full", "model_name_or_path": str(tiny_model_dir), "max_source_length": 64}
    code = _python_block(write_model_card(full_out, {"generation": {"max_new_tokens": 5}}, config).read_text())
    code = code.replace('"path/to/full"', repr(str(full_out)))
    namespace = {"dialogue": "#Person1#: Hi Bob, where are you going?\n#Person2#: To the park."}
    exec(compile(code, "model_card_full", "exec"), namespace)  # noqa: S102 - our own generated snippet
    assert namespace["summary_ids"].shape[-1] <= 6

    lora_out = tmp_path / "lora"
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    ).save_pretrained(lora_out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, lora_out / name)
    generation.save_pretrained(lora_out)
    config = {"method": "lora", "model_name_or_path": str(tiny_model_dir), "max_source_length": 64}
    code = _python_block(write_model_card(lora_out, {"generation": {"max_new_tokens": 5}}, config).read_text())
    code = code.replace('"path/to/lora"', repr(str(lora_out)))
    namespace = {"dialogue": "#Person1#: Hi Bob, where are you going?\n#Person2#: To the park."}
    exec(compile(code, "model_card_lora", "exec"), namespace)  # noqa: S102
    assert type(namespace["model"]).__name__ == "PeftModelForSeq2SeqLM"
    assert namespace["summary_ids"].shape[-1] <= 6  # the adapter folder's generation settings were used
