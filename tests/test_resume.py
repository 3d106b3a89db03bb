"""Exact resume: SIGKILL a real training process, resume with ``latest``, get the uninterrupted run bit for bit.

Setup (both methods): 20 training rows in batches of 4 = 5 batches per epoch; 2 micro-batches per optimizer
step, so an epoch is 3 optimizer steps (2 + 2 + 1, the last one cut short by the end of the data); 7 steps =
2 1/3 epochs; a checkpoint every 2 steps (2: mid-epoch 0, 4: mid-epoch 1 inside an accumulation cycle, 6: on
the last batch of epoch 1); a log line every 3 steps, so log windows straddle checkpoints. The tiny T5 has
dropout 0.1 (and LoRA its own 0.05), so any slip in the RNG restore changes the weights.

* full: killed while writing its first checkpoint (the restart with ``latest`` starts afresh), then killed
  *while writing* checkpoint-4 -> resumes from checkpoint-2 and crosses two epoch boundaries;
* LoRA: killed between checkpoints (after checkpoint-4) -> resumes mid-epoch inside an accumulation cycle;
* both: resumed from a copy of the reference's checkpoint-6 (saved on an epoch's last batch);
* the LoRA family combined (DoRA + rsLoRA + LoRA+ groups): killed between checkpoints, as LoRA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import HANG_TIMEOUT_S, REPO, run_script, subprocess_env
from safetensors.torch import load_file

from dialogsum.checkpointing import STATE_FILE, find_latest

LOG_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm")
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}
LEARNING_RATE = {"full": "3e-3", "lora": "1e-2"}
#: scenario -> (training script's method, extra flags)
SCENARIOS = {
    "full": ("full", []),
    "lora": ("lora", []),
    "dora-rslora-loraplus": ("lora", ["--use_dora", "--use_rslora", "--loraplus_lr_ratio", "4"]),
}


def _command(method: str, model: Path, data: Path, out: Path, *extra: str, **flags: str) -> list[str]:
    """``python scripts/train_<method>.py`` with the setup above; ``flags`` override single settings."""
    settings = {
        "model_name_or_path": str(model),
        "output_dir": str(out),
        "train_file": str(data / "train.jsonl"),
        "max_train_samples": "20",
        "per_device_train_batch_size": "4",
        "gradient_accumulation_steps": "2",
        "max_train_steps": "7",
        "logging_steps": "3",
        "checkpointing_steps": "2",
        "learning_rate": LEARNING_RATE[method],
        "max_source_length": "64",
        "max_target_length": "24",
        "report_to": "none",
        "do_eval": "false",
        **flags,
    }
    script = str(REPO / "scripts" / f"train_{method}.py")
    return [sys.executable, script, *(a for k, v in settings.items() for a in (f"--{k}", v)), *extra]


def _env() -> dict[str, str]:
    return subprocess_env(OMP_NUM_THREADS="1")  # a tiny model runs fastest on one thread


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = run_script(cmd, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill(cmd: list[str], out: Path, step: int, during_save: bool) -> str:
    """Start ``cmd`` and SIGKILL it while checkpoint-<step> is being written (``during_save``; if the poll
    misses that moment, just after), or just after it is complete. Returns where it was killed."""
    with open(out.parent / f"{out.name}.stderr", "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=str(REPO))
        where = None
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            names = set(os.listdir(out)) if out.is_dir() else set()
            if during_save and f"checkpoint-{step}.tmp" in names:
                where = f"while writing checkpoint-{step}"
            elif f"checkpoint-{step}" in names:
                where = f"after checkpoint-{step} was complete"
            if where:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.0005)
    assert where is not None, f"the run ended (code {proc.returncode}) before it could be killed"
    return where


def _weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHTS[method]))


def _log(out: Path) -> list[dict]:
    lines = (out / "log_history.jsonl").read_text().splitlines()
    return [{k: e.get(k) for k in LOG_KEYS} for e in map(json.loads, lines)]


def _scenario(name: str, model: Path, data: Path, root: Path) -> dict:
    """Reference run and a resume from a copy of its checkpoint-6 (one thread); kill + resume (another). The LoRA
    variant: reference and kill + resume only."""
    method, extra = SCENARIOS[name]

    def command(out: Path, *flags: str) -> list[str]:
        return _command(method, model, data, out, *extra, *flags)

    def reference() -> dict:
        ref = root / "reference"
        _run(command(ref))
        if extra:
            return {"reference": ref}
        copy = root / "from-checkpoint-6"  # a new output folder (its log starts from the checkpoint's copy)
        resumed = _run(command(copy, "--resume_from_checkpoint", str(ref / "checkpoint-6")))
        return {"reference": ref, "copy": copy, "copy_stderr": resumed.stderr}

    def killed() -> dict:
        out = root / "killed"
        latest_flag = ("--resume_from_checkpoint", "latest")  # the same command for every (re)start
        where = []
        if method == "full":  # first killed while writing its first checkpoint: the restart starts afresh
            where.append(_kill(command(out, *latest_flag), out, 2, during_save=True))
        where.append(_kill(command(out, *latest_flag), out, 4, during_save=method == "full"))
        latest = find_latest(out)
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
        resumed = _run(command(out, "--resume_from_checkpoint", "latest"))
        found = {"killed": out, "where": where, "latest": latest, "leftovers": leftovers, "stderr": resumed.stderr}
        return {"method": method, **found}

    with ThreadPoolExecutor(max_workers=2) as pool:
        a, b = pool.submit(reference), pool.submit(killed)
        return {**a.result(), **b.result()}


@pytest.fixture(scope="module")
def scenarios(
    tmp_path_factory: pytest.TempPathFactory, dropout_model: Path, synthetic_data_dir: Path
) -> dict[str, dict]:
    """Every scenario's runs (each scenario's two chains run side by side on the 2 cores)."""
    root = tmp_path_factory.mktemp("resume")
    results = {}
    for name in SCENARIOS:
        (root / name).mkdir()
        results[name] = _scenario(name, dropout_model, synthetic_data_dir, root / name)
    return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_run_resumes_to_the_uninterrupted_result(name: str, scenarios: dict[str, dict]) -> None:
    s = scenarios[name]
    method = s["method"]
    expected_start = "checkpoint-2" if s["where"][-1] == "while writing checkpoint-4" else "checkpoint-4"
    assert s["latest"] is not None and s["latest"].name == expected_start, (s["where"], s["leftovers"])
    assert f"resumed from {s['killed'] / expected_start}" in s["stderr"]

    ref, got = _weights(s["reference"], method), _weights(s["killed"], method)
    assert ref.keys() == got.keys()
    max_diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert all(torch.equal(ref[k], got[k]) for k in ref), f"max parameter difference {max_diff}"
    assert _log(s["killed"]) == _log(s["reference"])
    ref_metrics = json.loads((s["reference"] / "metrics.json").read_text())
    got_metrics = json.loads((s["killed"] / "metrics.json").read_text())
    assert got_metrics["train_loss"] == ref_metrics["train_loss"]
    assert got_metrics["train_steps"] == 7


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_from_the_last_batch_of_an_epoch(method: str, scenarios: dict[str, dict]) -> None:
    s = scenarios[method]
    state = json.loads((s["reference"] / "checkpoint-6" / STATE_FILE).read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 5)  # saved on epoch 1's last batch
    ref, got = _weights(s["reference"], method), _weights(s["copy"], method)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _log(s["copy"]) == _log(s["reference"])


def test_kill_during_save_leaves_only_loadable_checkpoints(scenarios: dict[str, dict]) -> None:
    """Whatever the kill left behind, ``latest`` is complete and loads (the resume above used it)."""
    s = scenarios["full"]
    assert "checkpoint-4.tmp" in s["leftovers"] or s["where"][-1] != "while writing checkpoint-4", s["leftovers"]
    latest = s["latest"]
    assert (latest / STATE_FILE).is_file()
    assert load_file(str(latest / "model.safetensors"))
    torch.load(latest / "optimizer.bin", weights_only=True)
    # the resumed run cleaned the partial folder up and wrote complete checkpoints in its place
    assert not any(p.name.endswith(".tmp") for p in s["killed"].iterdir())
    names = [p.name for p in sorted(s["killed"].glob("checkpoint-*"))]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_lora_checkpoints_hold_only_the_adapter(scenarios: dict[str, dict]) -> None:
    ckpt = scenarios["lora"]["reference"] / "checkpoint-6"
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert tensors and all("lora_" in name for name in tensors)
    full = scenarios["full"]["reference"] / "checkpoint-6" / "model.safetensors"
    assert (ckpt / "model.safetensors").stat().st_size < full.stat().st_size / 2


def test_resume_refuses_other_settings_naming_them(
    scenarios: dict[str, dict], dropout_model: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    checkpoint = scenarios["lora"]["reference"] / "checkpoint-6"
    resume = ("--resume_from_checkpoint", str(checkpoint))
    cmd = _command(
        "lora", dropout_model, synthetic_data_dir, tmp_path / "a", *resume, lora_r="8", max_source_length="32"
    )
    proc = run_script(cmd, env=_env())
    assert proc.returncode == 1
    error = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(error) == 1 and "settings differ" in error[0], proc.stderr[-2000:]
    assert "max_source_length: checkpoint 64 vs now 32" in error[0] and "lora_r: checkpoint 32 vs now 8" in error[0]
    assert "trainable" not in proc.stderr  # refused before the model was loaded

    cmd = _command("full", dropout_model, synthetic_data_dir, tmp_path / "b", *resume)
    proc = run_script(cmd, env=_env())
    assert proc.returncode == 1 and "method: checkpoint 'lora' vs now 'full'" in proc.stderr


@pytest.mark.slow
def test_two_processes_resume_bit_for_bit(dropout_model: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    """2 CPU processes (gloo): 22 rows in batches of 2 = 11 per epoch, which the sharder evens out to 6 per
    process by topping up from the epoch's first batches. Resumed from checkpoint-4 (mid-epoch 1, inside an
    accumulation cycle, each process with its own RNG and loss sums), the result is the uninterrupted one."""
    from helpers import accelerate_launch

    def launch(out: Path, *extra: str) -> None:
        sizes = {"max_train_samples": "22", "per_device_train_batch_size": "2", "max_train_steps": "5"}
        cmd = _command("full", dropout_model, synthetic_data_dir, out, *extra, checkpointing_steps="4", **sizes)
        proc = accelerate_launch("multi_cpu.yaml", "train_full.py", cmd[2:], env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]

    ref = tmp_path / "reference"
    launch(ref)
    state = json.loads((ref / "checkpoint-4" / STATE_FILE).read_text())
    assert (state["num_processes"], state["epoch"], state["batches_in_epoch"]) == (2, 1, 4)
    copy = tmp_path / "resumed"  # a new output folder (its log starts from the checkpoint's copy)
    launch(copy, "--resume_from_checkpoint", str(ref / "checkpoint-4"))
    a, b = _weights(ref, "full"), _weights(copy, "full")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(copy) == _log(ref)


def test_adafactor_resumes_bit_for_bit(dropout_model: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    """--optim adafactor: resumed from checkpoint-4 (mid-epoch 1, inside an accumulation cycle), the run ends
    with the uninterrupted run's weights and log; the checkpoint holds Adafactor's factored state. (Resuming it with
    another optimizer is refused: test_checkpointing.)"""
    adafactor = ("--optim", "adafactor")
    ref = tmp_path / "reference"
    _run(_command("full", dropout_model, synthetic_data_dir, ref, *adafactor))
    optimizer = torch.load(ref / "checkpoint-4" / "optimizer.bin", weights_only=True)
    states = list(optimizer["state"].values())
    assert any("exp_avg_sq_row" in s for s in states) and not any("exp_avg" in s for s in states)

    copy = tmp_path / "resumed"  # a new output folder, resumed from the reference's checkpoint-4 (and its log copy)
    checkpoint = ref / "checkpoint-4"
    resumed = _run(
        _command(
            "full", dropout_model, synthetic_data_dir, copy, *adafactor, "--resume_from_checkpoint", str(checkpoint)
        )
    )
    assert f"resumed from {checkpoint}" in resumed.stderr
    a, b = _weights(ref, "full"), _weights(copy, "full")
    start = load_file(str(dropout_model / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(copy) == _log(ref)


def test_the_lora_family_run_used_every_variant(scenarios: dict[str, dict]) -> None:
    ref = scenarios["dora-rslora-loraplus"]["reference"]
    config = json.loads((ref / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert any("lora_magnitude_vector" in name for name in _weights(ref, "lora"))  # DoRA's magnitudes, resumed too
    assert "loraplus_lr_ratio: 4.0" in (ref / "config.yaml").read_text()
