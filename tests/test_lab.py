"""scripts/lab.py: the four stages as real `accelerate launch` processes into one folder, flags passed through,
the comparison table printed; bad flags refused before any stage runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import REPO, run_script, subprocess_env

LAB = [sys.executable, str(REPO / "scripts" / "lab.py")]


def test_quick_lab_runs_every_stage_into_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "lab"
    args = ["--quickstart", "--output_dir", str(out), "--max_train_steps", "20", "--max_test_samples", "12",
            "--lora_args", "--lora_r 4 --use_rslora", "--num_samples", "1", "--methods", "full,lora,ia3",
            "--ia3_args=--merge_lora"]  # fmt: skip
    proc = run_script([*LAB, *args], env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"original", "full", "lora", "ia3", "comparison", "quickstart_assets"}
    for stage in ("original", "full", "lora", "ia3"):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["num_eval_examples"] == 12, stage  # --max_test_samples reached every stage
    assert json.loads((out / "full" / "metrics.json").read_text())["train_steps"] == 20
    lora = json.loads((out / "lora" / "metrics.json").read_text())
    assert lora["train_steps"] == 20 and lora["method"] == "lora"
    assert "lora_r: 4" in (out / "lora" / "config.yaml").read_text()
    assert "lora_r: 32" in (out / "full" / "config.yaml").read_text()  # --lora_args went to train_lora.py only
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    systems = {s["name"]: s for s in comparison["systems"]}
    assert list(systems) == ["original", "full", "lora", "ia3"]
    assert systems["lora"]["method_detail"] == "LoRA r=4 alpha=32 q,k,v,o rsLoRA"
    assert systems["ia3"]["method_detail"] == "IA3 k,v,wo (feed-forward wo)"
    ia3 = json.loads((out / "ia3" / "metrics.json").read_text())
    assert ia3["method"] == "ia3" and ia3["train_steps"] == 20 and ia3["trainable_params"] == 1_280  # k, v, wo
    assert systems["ia3"]["resources"]["trainable_params"] == 1_280
    table = (out / "comparison" / "comparison.md").read_text()
    assert "| ia3 | IA3 k,v,wo (feed-forward wo) |" in table and "| lora | LoRA r=4 alpha=32 q,k,v,o rsLoRA |" in table
    # IA3 went through the card, the report and --merge_lora like LoRA
    assert "a (IA)^3 adapter for" in (out / "ia3" / "README.md").read_text()
    assert "| adapter | IA3 k,v,wo (feed-forward wo) |" in (out / "ia3" / "report.md").read_text()
    assert (out / "ia3" / "merged" / "model.safetensors").is_file()
    # the stages as a user would type them, and the table on standard output
    for script in ("evaluate.py", "train_full.py", "train_lora.py", "train_ia3.py"):
        assert f"accelerate launch --config_file {REPO / 'accelerate_configs' / 'cpu.yaml'} " in proc.stderr
        assert str(REPO / "scripts" / script) in proc.stderr
    assert "ROUGE-1" in proc.stdout and "original" in proc.stdout and "lora" in proc.stdout

    again = run_script([*LAB, *args], env=subprocess_env())  # the folder holds the results now
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert again.returncode == 1 and len(errors) == 1 and "pass --overwrite_output_dir" in errors[0]


def test_bad_flags_stop_the_lab_before_any_stage(tmp_path: Path) -> None:
    for args, message in (
        (["--learning_rate", "-1"], "--learning_rate must be in (0, 1)"),
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--source_prefix", "x"], "--source_prefix is --prompt_template here"),
        (["--config", "x.yaml"], "--config is set by the lab for each stage"),
        (["--methods", "full,dora"], "--methods takes a comma-separated list of full, lora, ia3, got 'full,dora'"),
    ):
        proc = run_script([*LAB, "--quickstart", "--output_dir", str(tmp_path / "lab"), *args])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "==>" not in proc.stderr and not (tmp_path / "lab").exists()
