"""The prepared GPU session (tools/gpu_session.py), checked here so that it runs at once on a device.

No GPU and no registry: ``prepare --skip_wheels`` copies the model and data files; every command of the device run
parses with its script's own parser, names cases that exist in the GPU plan, and fits the device tool's limits;
``run`` on this CPU machine stops at once with exit code 3 and says what it needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_script

from tools import benchmark, gpu_check
from tools.gpu_session import EXTRA_CASES, MODEL_FILES, Layout, phases, prepare


@pytest.fixture
def layout(tmp_path: Path, flan_t5_base_dir: Path, dialogsum_dev: Path) -> Layout:
    layout = Layout(tmp_path / "session")
    prepare(flan_t5_base_dir.parents[1], layout, skip_wheels=True)
    return layout


def test_prepare_copies_the_model_files_and_the_dev_data(layout: Layout, dialogsum_dev: Path) -> None:
    assert sorted(p.name for p in layout.model.iterdir()) == sorted(MODEL_FILES)
    assert layout.data.read_bytes() == dialogsum_dev.read_bytes()
    assert not any(p.suffix == ".safetensors" for p in layout.model.iterdir())  # random weights on the device
    size = sum(p.stat().st_size for p in layout.root.rglob("*") if p.is_file())
    assert size < 8e6  # the device tool carries 64 MB with the repository; the wheels take ~25


def test_device_commands_parse_and_name_existing_cases(tmp_path: Path, layout: Layout) -> None:
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    found = phases(out, tmp, layout)
    assert [name for name, _, _ in found] == ["benchmark", "gpu_check", "benchmark_extra"]
    bench, check, extra = (cmd for _, cmd, _ in found)
    assert bench[1] == "scripts/benchmark.py" and check[1] == "scripts/gpu_check.py"
    quick = benchmark.parse_args(bench[2:])
    assert quick.quick and quick.steps == 10 and quick.warmup_steps == 3 and quick.token_budgets == [16384, 65536]
    assert Path(quick.output_json).parent == out and Path(quick.model_dir) == layout.model
    args = gpu_check.parse_args(check[2:])
    assert args.parallel == 4 and args.steps == 20 and args.only is None  # every launch path
    names = [r.name for r in gpu_check.plan(cpu=False)]
    assert "zero3 lora" in names and "fsdp full" in names
    fsdp = next(r for r in gpu_check.plan(cpu=False) if r.name == "fsdp full")
    assert fsdp.config == "fsdp.yaml" and fsdp.launch_args == ["--num_processes", "1"]
    full = benchmark.parse_args(extra[2:])
    gpu_plan = {c.name for c in benchmark.plan_cases("bf16", True, True, True, tuple(full.token_budgets))}
    assert set(full.only) == set(EXTRA_CASES) and set(EXTRA_CASES) <= gpu_plan
    # at most 8 result files come back from the device: the ones the run writes
    assert len({"env.json", "session.log", "bench_gpu.json", "bench_gpu.txt", "gpu_check.json", "gpu_check.md",
                "bench_gpu_extra.json", "failures.txt"}) == 8  # fmt: skip


def test_run_without_a_gpu_stops_at_once_and_says_what_it_needs(tmp_path: Path, layout: Layout) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tools.gpu_session", "run", "--out", str(out), "--root", str(layout.root)]
    proc = run_script(cmd)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    env = json.loads((out / "env.json").read_text())
    assert env["torch_probe"].endswith("False") and "CUDA build of torch" in env["needs"]
    assert "NOT usable" in (out / "session.log").read_text()


def test_run_without_prepare_says_so(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tools.gpu_session", "run", "--out", str(tmp_path / "out")]
    proc = run_script([*cmd, "--root", str(tmp_path / "nothing")], cwd=REPO)
    assert proc.returncode == 2 and "gpu_session prepare" in proc.stdout
