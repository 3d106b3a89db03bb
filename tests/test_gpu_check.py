"""scripts/gpu_check.py on CPU (``--cpu``): the plan runs through the real launcher and writes its table.

A GPU is not needed to check that the script itself works: ``--cpu`` runs the same steps with cpu.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import REPO, run_script

GPU_CHECK = str(REPO / "scripts" / "gpu_check.py")


def test_cpu_run_writes_table_and_json(tmp_path: Path, quickstart_assets: tuple[Path, Path]) -> None:
    model_dir, data_dir = quickstart_assets
    work = tmp_path / "check"
    args = ["--cpu", "--model_dir", str(model_dir), "--data_file", str(data_dir / "train.jsonl")]
    args += ["--work_dir", str(work), "--steps", "10", "--batch_size", "4", "--max_source_length", "96"]
    args += ["--max_target_length", "32", "--eval_samples", "3", "--only", "lora"]
    proc = run_script([sys.executable, GPU_CHECK, *args])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((work / "gpu_check.json").read_text())
    assert report["device"] == "cpu"
    (row,) = report["runs"]
    assert row["run"] == "lora" and row["status"] == "ok" and row["config"] == "cpu.yaml"
    assert row["tokens_per_s"] > 0 and row["step_time_s"] > 0 and row["peak_memory_gb"] > 0
    assert row["predictions"] == 3
    assert row["mfu"] is None  # no peak given for a CPU
    assert row["compiled"] is False and row["parallel"] == 1  # cpu.yaml has no dynamo_config
    # the memory estimate of the same run beside the measured peak (no CUDA runtime term on a CPU)
    from dialogsum import memory

    setup = memory.Setup(dims=memory.resolve_dims(str(model_dir)), method="lora", batch=4, source_len=96,
                         target_len=32, precision="fp32", device="cpu")  # fmt: skip
    assert row["estimate_gb"] == round(memory.estimate(setup)[0].gpu_bytes / 1e9, 2) > 0
    table = (work / "gpu_check.md").read_text()
    assert "| lora | cpu.yaml | no |" in table and "| ok |" in table and "estimate (GB)" in table
    assert (work / "lora" / "adapter_model.safetensors").is_file()


def test_unknown_run_name_is_refused_before_any_work(tmp_path: Path, quickstart_assets: tuple[Path, Path]) -> None:
    model_dir, data_dir = quickstart_assets
    work = tmp_path / "check"
    args = ["--cpu", "--model_dir", str(model_dir), "--data_file", str(data_dir / "train.jsonl")]
    proc = run_script([sys.executable, GPU_CHECK, *args, "--work_dir", str(work), "--only", "ful"])
    assert proc.returncode != 0
    assert "--only matched no run" in proc.stderr and "zero3 lora +gc" in proc.stderr
    assert "fsdp" not in proc.stderr  # FSDP needs GPUs: not in the CPU plan
    assert not work.exists()
