"""Multi-process CPU training that really is multi-process, checked with real `accelerate launch` runs.

A tiny probe script (build the Accelerator, all-reduce, finish) shows the launch mechanics; the real
training scripts then run on 2 CPU processes over gloo with the quickstart model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script, subprocess_env
from helpers import HANG_TIMEOUT_S
from safetensors.torch import load_file

from dialogsum.distributed import launch_request_from_argv

CONFIGS = REPO / "accelerate_configs"
#: DeepSpeed compiles its CPU ops once and caches them here (CI keeps this directory between runs).
TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

PROBE = """
import json, os, sys, torch
from dialogsum.distributed import build_accelerator, finish, is_zero3
from dialogsum.provenance import topology
from dialogsum.errors import UserError
try:
    accelerator = build_accelerator()
except UserError as exc:
    sys.stderr.write(f"error: {exc}\\n")
    sys.exit(1)
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
report = {**topology(accelerator), "sum": float(total), "threads": torch.get_num_threads()}
report["zero3"] = is_zero3(accelerator)
os.write(1, ("PROBE " + json.dumps(report) + "\\n").encode())  # one write: ranks' lines never interleave
finish(accelerator)
"""


#: The real training script (scripts/train_{full,lora}.py's main), with modeling.save_model wrapped so that each
#: rank first records the trained parameters it holds (gathered under ZeRO-3) in $RANK_DIR/rank<i>.safetensors.
RECORDING_TRAINER = """
import contextlib, os, re, runpy, sys
from safetensors.torch import save_file
import dialogsum.modeling as modeling
from dialogsum.cli import run_cli
from dialogsum.distributed import is_zero3

real_save_model = modeling.save_model

def recording_save_model(accelerator, model, tokenizer, output_dir):
    unwrapped = accelerator.unwrap_model(model)
    params = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if is_zero3(accelerator):
        import deepspeed
        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    with gather:
        # named as peft saves them (DoRA's "lora_magnitude_vector.default.weight" as "lora_magnitude_vector", IA3's
        # "ia3_l.default" as "ia3_l")
        names = [re.sub(r"\\.default(\\.|$)", r"\\1", n).replace("magnitude_vector.weight", "magnitude_vector")
                 for n, _ in params]
        tensors = {n: p.detach().cpu().float().clone().contiguous() for n, (_, p) in zip(names, params)}
    save_file(tensors, os.path.join(os.environ["RANK_DIR"], f"rank{accelerator.process_index}.safetensors"))
    return real_save_model(accelerator, model, tokenizer, output_dir)

modeling.save_model = recording_save_model
method = sys.argv.pop(1)
run_cli(runpy.run_path(os.path.join(os.environ["REPO"], "scripts", f"train_{method}.py"))["main"])
"""


def recording_trainer(directory: Path) -> Path:
    """Write the recording training entry point into ``directory``; return its path."""
    path = directory / "recording_train.py"
    path.write_text(RECORDING_TRAINER)
    return path


def launch_recording(
    config: str,
    method: str,
    args: list[str],
    workdir: Path,
    launch_args: list[str] | None = None,
    timeout: int = HANG_TIMEOUT_S,
) -> tuple[subprocess.CompletedProcess, list[dict[str, torch.Tensor]]]:
    """Train with the real training script in ``accelerate launch``; return the process and each rank's parameters."""
    rank_dir = workdir / "ranks"
    rank_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        *(launch_args or []),
        str(recording_trainer(workdir)),
        method,
        *args,
    ]
    env = subprocess_env(RANK_DIR=str(rank_dir), TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR, REPO=str(REPO))
    proc = run_script(cmd, timeout=timeout, env=env)
    ranks = [load_file(str(p)) for p in sorted(rank_dir.glob("rank*.safetensors"))]
    return proc, ranks


def assert_ranks_identical(ranks: list[dict[str, torch.Tensor]], world: int) -> None:
    """Every rank ended training with exactly the same parameters."""
    assert len(ranks) == world
    for other in ranks[1:]:
        assert other.keys() == ranks[0].keys()
        for name, value in ranks[0].items():
            assert torch.equal(value, other[name]), f"{name} differs across ranks"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


def launch(launch_args: list[str], script: Path, timeout: int = HANG_TIMEOUT_S) -> tuple[int, list[dict], str]:
    """Run ``accelerate launch <launch_args> script``; return (exit code, probe reports, stderr)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script)]
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS", None)  # as on a fresh shell: the launcher decides
    proc = run_script(cmd, timeout=timeout, env=env)
    reports = [json.loads(line[len("PROBE ") :]) for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    return proc.returncode, reports, proc.stderr


# ------------------------------------------------------------------------- what the user asked the launcher


def test_request_from_num_processes_flag() -> None:
    request = launch_request_from_argv(["--cpu", "--num_processes", "2", "train.py", "--x", "1"], {})
    assert request is not None
    assert request.num_processes == 2 and request.use_cpu
    assert not request.threads_explicit


def test_request_from_config_file_and_flag_override() -> None:
    config = str(CONFIGS / "multi_cpu.yaml")
    request = launch_request_from_argv(["--config_file", config, "train.py"], {})
    assert request is not None and request.num_processes == 2 and request.use_cpu
    request = launch_request_from_argv(["--config_file", config, "--num_processes=3", "train.py"], {})
    assert request is not None and request.num_processes == 3


def test_request_notices_user_thread_choice() -> None:
    request = launch_request_from_argv(["--num_cpu_threads_per_process", "1", "train.py"], {})
    assert request is not None and request.threads_explicit
    request = launch_request_from_argv(["train.py"], {"OMP_NUM_THREADS": "1"})
    assert request is not None and request.threads_explicit


# ------------------------------------------------------------------------- real launches of the probe


def test_multi_cpu_config_runs_two_communicating_processes(probe: Path) -> None:
    code, reports, stderr = launch(["--config_file", str(CONFIGS / "multi_cpu.yaml")], probe)
    assert code == 0, stderr[-3000:]
    assert sorted(r["process_index"] for r in reports) == [0, 1]
    for r in reports:
        assert r["num_processes"] == 2
        assert r["distributed_type"] == "MULTI_CPU"
        assert r["sum"] == 3.0  # 1 + 2: the all-reduce really crossed processes
        assert r["device"].startswith("cpu")
        assert not r["zero3"]


@pytest.mark.parametrize(
    "launch_args",
    [["--cpu", "--num_processes", "2"], ["--config_file", "MULTI_CPU"]],
    ids=["cpu-flag", "multi-cpu-config"],
)
def test_silent_single_process_launches_are_refused(probe: Path, tmp_path: Path, launch_args: list[str]) -> None:
    if launch_args[-1] == "MULTI_CPU":
        config = tmp_path / "multi_cpu_type.yaml"
        config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\n")
        launch_args = ["--config_file", str(config)]
    code, reports, stderr = launch(launch_args, probe)
    assert code != 0
    assert reports == []
    assert "error: 2 processes were requested" in stderr
    assert "accelerate_configs/multi_cpu.yaml" in stderr


def test_fsdp_config_on_cpu_is_refused(probe: Path, tmp_path: Path) -> None:
    """accelerate would run an FSDP config as plain data parallel on the CPU; say so instead."""
    config = tmp_path / "fsdp_cpu.yaml"
    text = (CONFIGS / "fsdp.yaml").read_text().replace("mixed_precision: bf16", "mixed_precision: 'no'")
    config.write_text(text + "use_cpu: true\n")
    code, reports, stderr = launch(["--config_file", str(config)], probe)
    assert code != 0 and reports == []
    assert "error: the accelerate config asks for FSDP, which needs GPUs" in stderr


@pytest.mark.parametrize(
    "launch_args",
    [["--num_processes", "1"], ["--config_file", str(CONFIGS / "cpu.yaml")]],
    ids=["plain-launch", "cpu-config"],
)
def test_single_cpu_process_uses_every_core(probe: Path, launch_args: list[str]) -> None:
    code, reports, stderr = launch(launch_args, probe)
    assert code == 0, stderr[-3000:]
    (report,) = reports
    assert report["num_processes"] == 1
    # `accelerate launch --num_processes 1` exports OMP_NUM_THREADS=1; build_accelerator restores all cores.
    assert report["threads"] == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_repeated_launches_exit_cleanly(probe: Path) -> None:
    """gloo used to abort at exit about one run in four; every launch must exit 0."""
    repeats = int(os.environ.get("DIALOGSUM_LAUNCH_REPEATS", "20"))
    failures = []
    for attempt in range(repeats):
        code, reports, stderr = launch(["--config_file", str(CONFIGS / "multi_cpu.yaml")], probe)
        if code != 0 or len(reports) != 2:
            failures.append((attempt, code, stderr[-800:]))
    assert not failures, failures[:2]


# ------------------------------------------------------------------------- the real training scripts

FAST = [
    "--quickstart",
    "--report_to",
    "none",
    "--max_train_steps",
    "6",
    "--per_device_train_batch_size",
    "8",
    "--max_test_samples",
    "7",  # not divisible by the world size
    "--per_device_eval_batch_size",
    "2",
    "--logging_steps",
    "2",
]


def _read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=["full", "lora"])
def two_process_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A quickstart training run on 2 CPU processes (multi_cpu.yaml): (method, output dir, process, ranks)."""
    method = request.param
    workdir = tmp_path_factory.mktemp(f"two_process_{method}")
    out = workdir / "out"
    proc, ranks = launch_recording("multi_cpu.yaml", method, [*FAST, "--output_dir", str(out)], workdir)
    return method, out, proc, ranks


@pytest.mark.slow
def test_two_process_training(two_process_run) -> None:
    method, out, proc, ranks = two_process_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_ranks_identical(ranks, world=2)
    metrics = _read_metrics(out)
    assert metrics["num_processes"] == 2
    assert metrics["distributed_type"] == "MULTI_CPU"
    assert metrics["train_steps"] == 6
    # exactly N predictions, each dialogue once, for N = 7 on 2 processes
    preds = _predictions(out)
    assert metrics["num_eval_examples"] == 7 and len(preds) == 7
    assert len({p["id"] for p in preds}) == 7
    assert "effective batch: 8 per device x 1 accumulation x 2 process(es) = 16" in proc.stderr
    # the LR schedule advances once per optimizer step: steps 2, 4, 6 logged, lr strictly decreasing
    # (linear decay after warm-up) and reaching 0 exactly at the last optimizer step.
    history = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    train_logs = [h for h in history if "loss" in h and "learning_rate" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6]
    lrs = [h["learning_rate"] for h in train_logs]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert_saved_equals_trained(out, method, ranks[0])


def assert_saved_equals_trained(out: Path, method: str, trained: dict[str, torch.Tensor]) -> None:
    """The saved weights are non-empty and are the trained ones (adapter: every LoRA or IA3 tensor)."""
    weights = out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    saved = load_file(str(weights))
    assert saved and all(t.numel() > 0 for t in saved.values()), "empty tensors saved (ZeRO-3 gather missing?)"
    common = [name for name in trained if name in saved]
    if method != "full":
        assert sorted(common) == sorted(saved), "every saved adapter tensor is a trained one"
    if method == "lora":
        assert any(float(saved[n].abs().max()) > 0 for n in saved if "lora_B" in n), "lora_B still at its zero init"
    if method == "ia3":
        assert any(not torch.equal(t, torch.ones_like(t)) for t in saved.values()), "IA3 vectors still at their ones"
    else:
        assert len(common) >= len(trained) - 1, "all trained parameters saved (tied embeddings count once)"
    for name in common:
        torch.testing.assert_close(
            saved[name].float(), trained[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("two_process_run", ["full"], indirect=True)  # LoRA dropout draws differ per process
def test_accumulation_matches_processes(two_process_run, quickstart_assets: tuple[Path, Path], tmp_path: Path) -> None:
    """1 process x accumulation 2 takes the same optimizer steps as 2 processes x accumulation 1."""
    _, two, proc, _ = two_process_run
    assert proc.returncode == 0
    model_dir = quickstart_assets[0]
    assert json.loads((model_dir / "config.json").read_text()).get("dropout_rate", 0.0) == 0.0
    one = tmp_path / "one"
    # cpu.yaml asks for bf16; the 2-process side (multi_cpu.yaml) is fp32, so pin fp32 here too.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu.yaml")]
    cmd += ["--mixed_precision", "no", str(REPO / "scripts" / "train_full.py")]
    cmd += [*FAST, "--gradient_accumulation_steps", "2", "--output_dir", str(one)]
    p1 = run_script(cmd)
    assert p1.returncode == 0, p1.stderr[-4000:]
    assert "effective batch: 8 per device x 2 accumulation x 1 process(es) = 16" in p1.stderr
    start = load_file(str(two / "quickstart_assets" / model_dir.name / "model.safetensors"))
    a = load_file(str(one / "model.safetensors"))
    b = load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        if name in start:
            moved = max(moved, float((a[name] - start[name]).abs().max()))
    assert moved > 1e-3, "training must have changed the weights for the comparison to mean anything"


# ------------------------------------------------------------------------- a failing or hung process

#: A script whose rank $FAIL_RANK alone raises a UserError (as a file only that process cannot read would).
FAILING_RANK = """
import os
from dialogsum.cli import run_cli
from dialogsum.errors import UserError

def main(argv):
    from dialogsum.distributed import build_accelerator, finish
    accelerator = build_accelerator()
    if accelerator.process_index == int(os.environ["FAIL_RANK"]):
        raise UserError(f"cannot read shard-{accelerator.process_index}.jsonl")
    accelerator.wait_for_everyone()
    finish(accelerator)

run_cli(main)
"""


def _error_lines(stderr: str) -> list[str]:
    """Our own lines (``error: ...`` / ``[rank N] error: ...``), without the launcher's report."""
    return [line for line in stderr.splitlines() if line.startswith(("error: ", "[rank "))]


def torchrun(args: list[str]) -> list[str]:
    """``torchrun`` (torch's own launcher, no accelerate) with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_a_rank_failing_alone_prints_its_own_line(tmp_path: Path) -> None:
    """Only rank 1 fails: it says so itself, prefixed by its rank; rank 0 says one line, no gloo traceback."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cmd = torchrun(["--nproc_per_node", "2", str(script)])
    proc = run_script(cmd, timeout=180, env=subprocess_env(FAIL_RANK="1", OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == [
        "[rank 1] error: cannot read shard-1.jsonl",
        "error: a collective at the start of the run failed: another process ended (its own error is printed above)",
    ], proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr  # no process's traceback ([rank0]: ...), only the launcher's report


def test_collective_failures_become_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (a 1-process gloo group; a HashStore as the launcher's store, rank 2 of 4 reporting too): a gloo
    timeout, also when a failing barrier in a ``finally`` follows it, names the ranks that never reported; a peer
    that ended and other errors are told apart."""
    import torch.distributed as dist

    from dialogsum import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "ARRIVAL_GRACE_S", 0.2)
    monkeypatch.setattr(distributed, "PROGRESS", distributed.Progress(where="training step 7", timeout_s=60))
    store = dist.HashStore()
    store.set("dialogsum/arrived/0/2", "training step 7")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        try:
            try:
                raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv")
            finally:
                raise RuntimeError("Application timeout caused pair closure")  # noqa: B012 - as finish()'s barrier
        except RuntimeError as exc:
            chained = exc
        message = distributed.collective_failure_message(chained, store)
        assert message is not None and message.startswith(
            "a collective at training step 7 timed out after --ddp_timeout 60 s: ranks 1, 3 did not arrive (stopped, "
        )
        assert store.check(["dialogsum/arrived/0/0"])  # this process reported itself
        assert "another process did not arrive" in str(distributed.collective_failure_message(chained, None))
        peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:430.")
        assert distributed.collective_failure_message(peer, None) == (
            "a collective at training step 7 failed: another process ended (its own error is printed above)"
        )
        assert distributed.collective_failure_message(ValueError("timed out"), store) is None
    finally:
        dist.destroy_process_group()


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the launched process with RANK=rank (a child of the launcher)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


#: Short, yet long enough for the two processes' start (imports, model load) on a busy 2-core machine.
DDP_TIMEOUT_S = 15


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_with_its_name(quickstart_assets: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGSTOP rank 1 after a checkpoint: within --ddp_timeout (+ a few seconds) rank 0 says which rank did not
    arrive and at which step and ends, the job ends non-zero, and the latest checkpoint is complete."""
    import signal
    import time

    import psutil

    from dialogsum.checkpointing import check_checkpoint_files, find_latest, read_state

    model, data = quickstart_assets  # built beforehand: building them is a long wait for rank 1 (over 10 s)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_cpu.yaml")]
    cmd += [str(REPO / "scripts" / "train_full.py"), "--model_name_or_path", str(model), "--output_dir", str(out)]
    cmd += ["--train_file", str(data / "train.jsonl"), "--do_eval", "false", "--report_to", "none"]
    cmd += ["--max_source_length", "96", "--max_target_length", "32", "--per_device_train_batch_size", "4"]
    cmd += ["--max_train_steps", "100000", "--checkpointing_steps", "3", "--save_total_limit", "2"]
    cmd += ["--ddp_timeout", str(DDP_TIMEOUT_S)]
    err = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env(), cwd=str(REPO))
    stopped = None
    try:
        deadline = time.monotonic() + 300
        while find_latest(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        main, stopped = _rank_pid(proc, 0), _rank_pid(proc, 1)
        assert main and stopped and proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        psutil.Process(main).wait(timeout=300)  # rank 0 gives up on its own
        main_ended_after = time.monotonic() - stopped_at
        # the launcher would now SIGTERM the stopped process and SIGKILL it 30 s later: spare the wait
        os.kill(stopped, signal.SIGKILL)
        code = proc.wait(timeout=300)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):  # the launcher kills it once the others have ended
                os.kill(stopped, signal.SIGKILL)  # a stopped process ends only on SIGKILL
        if proc.poll() is None:
            proc.kill()
        err.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    print(f"rank 0 ended {main_ended_after:.1f} s after rank 1's SIGSTOP (--ddp_timeout {DDP_TIMEOUT_S})")
    assert code != 0
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert re.fullmatch(
        rf"error: a collective at training step \d+ timed out after --ddp_timeout {DDP_TIMEOUT_S} s: rank 1 did not "
        r"arrive \(stopped, hung on I/O or a deadlock, or far slower\); every process stops here\. Continue from the "
        r"latest complete checkpoint with --resume_from_checkpoint latest; raise --ddp_timeout if that process "
        r"was only slow",
        lines[0],
    ), lines[0]
    latest = find_latest(out)
    assert latest is not None
    check_checkpoint_files(latest)  # complete: every listed file there and readable
    assert read_state(latest).step % 3 == 0
    assert not list(out.glob("checkpoint-*.tmp"))


# ------------------------------------------------------------------------- torchrun and SLURM (docs/multi-node.md)

MULTI_NODE_DOC = REPO / "docs" / "multi-node.md"


def slurm_launch_lines() -> dict[str, str]:
    """The two ``srun`` lines of the sbatch example in docs/multi-node.md (continuations joined, the torchrun one
    uncommented), by launcher: ``{"accelerate": ..., "torchrun": ...}``."""
    block = MULTI_NODE_DOC.read_text().split("```bash\n#!/bin/bash\n", 1)[1].split("```", 1)[0]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw[2:] if raw.startswith("# srun") or (current and raw.startswith("#     ")) else raw
        current += line.rstrip("\\").strip() + " " if current or line.startswith("srun ") else ""
        if current and not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return {line.split('"')[1].split()[0]: line for line in lines}


def test_slurm_example_escapes_the_node_id() -> None:
    lines = slurm_launch_lines()
    assert sorted(lines) == ["accelerate", "torchrun"]
    for line in lines.values():
        assert line.startswith('srun bash -c "') and line.endswith('$TRAIN"')
        assert "\\$SLURM_NODEID" in line  # expanded by each machine's task, not by the batch script
        assert "$SLURM_NNODES" in line and "\\$SLURM_NNODES" not in line


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_slurm_line(
    launcher: str, nodes: int, per_node: int, train: list[str], unshared: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the doc's srun line for ``launcher`` on this machine as ``nodes`` pretend machines x ``per_node``
    processes, with ``train`` (script and flags) as ``$TRAIN``: ``srun`` starts one background task per node with
    its own SLURM_NODEID (the batch script's own SLURM_NODEID is a wrong value, so an unescaped one would fail).
    ``unshared``: node 1 runs in its own mount namespace with an empty tmpfs over that folder (a machine that does
    not share it)."""
    line = slurm_launch_lines()[launcher].replace("accelerate_configs/multi_gpu.yaml", str(CONFIGS / "multi_cpu.yaml"))
    wrap = ""
    if unshared is not None:
        mount = f'mount -t tmpfs none {shlex.quote(str(unshared))} && exec "$@"'
        wrap = f'if [ $n = 1 ]; then set -- unshare -Urm sh -c {shlex.quote(mount)} sh "$@"; fi; '
    script = f"""
export SLURM_NNODES={nodes} SLURM_NODEID=7 MASTER_ADDR=127.0.0.1 MASTER_PORT={free_port()}
GPUS_PER_NODE={per_node}
TRAIN={shlex.quote(shlex.join(train))}
srun() {{
  pids=""
  for n in $(seq 0 $((SLURM_NNODES - 1))); do
    ( {wrap}SLURM_NODEID=$n exec "$@" ) & pids="$pids $!"
  done
  status=0
  for p in $pids; do wait $p || status=$?; done
  return $status
}}
{line}
"""
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    return run_script(["bash", "-c", script], timeout=600, env=env)


def test_slurm_accelerate_line_starts_two_communicating_processes(probe: Path) -> None:
    """The doc's accelerate srun line as 2 pretend machines x 1 process (the probe in place of the training,
    which accelerate launch with multi_cpu.yaml already trains in test_two_process_training)."""
    proc = run_slurm_line("accelerate", 2, 1, [str(probe)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line[len("PROBE ") :]) for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert sorted(r["process_index"] for r in reports) == [0, 1]
    assert all(r["num_processes"] == 2 and r["sum"] == 3.0 and r["distributed_type"] == "MULTI_CPU" for r in reports)


@pytest.mark.slow
@pytest.mark.parametrize("two_process_run", ["full"], indirect=True)
@pytest.mark.parametrize(("nodes", "per_node"), [(1, 2), (2, 1)], ids=["1x2", "2x1"])
def test_slurm_torchrun_line_trains_like_accelerate_launch(
    two_process_run, nodes: int, per_node: int, tmp_path: Path
) -> None:
    """The doc's torchrun srun line, run here (one machine x 2, two machines x 1): the same weights and losses as
    `accelerate launch` with multi_cpu.yaml, and metrics.json names the real launcher."""
    _, reference, first, _ = two_process_run
    assert first.returncode == 0
    out = tmp_path / "out"
    proc = run_slurm_line(
        "torchrun", nodes, per_node, [str(REPO / "scripts" / "train_full.py"), *FAST, "--output_dir", str(out)]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = _read_metrics(out)
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    command = shlex.split(metrics["command"])
    assert command[0] == "torchrun" and command[command.index("--nnodes") + 1] == str(nodes)
    assert metrics["launch_environment"]["WORLD_SIZE"] == "2"
    assert metrics["launch_environment"]["SLURM_NNODES"] == str(nodes)
    assert metrics["launch_environment"]["SLURM_NODEID"] == "0"  # the main process's own node
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    losses = [[h["loss"] for h in _history(o) if "loss" in h] for o in (out, reference)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def _history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_machines_without_a_shared_folder_are_refused(tmp_path: Path) -> None:
    """Two pretend machines (torchrun 2 x 1); the second sees its own empty folder at the --checkpoint_dir path
    (a tmpfs in its own mount namespace): refused before training, with one line, on every process."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"], check=False).returncode:
        pytest.skip("needs unshare (user and mount namespaces) to give one process its own folder")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    out = tmp_path / "out"
    train = [
        str(REPO / "scripts" / "train_full.py"),
        *FAST,
        "--output_dir",
        str(out),
        "--checkpoint_dir",
        str(checkpoints),
    ]
    proc = run_slurm_line("torchrun", 2, 1, train, unshared=checkpoints)
    assert proc.returncode != 0
    assert _error_lines(proc.stderr) == [
        f"error: --checkpoint_dir {checkpoints} is not one folder shared by every process: rank(s) 1 (on "
        f"{socket.gethostname()}) do not see the file rank 0 wrote there. Checkpoints and resuming on several "
        "machines need a shared folder (NFS, EFS, FSx, a cluster file system): give one as --checkpoint_dir"
    ], proc.stderr[-4000:]
    assert list(checkpoints.iterdir()) == []  # nothing trained, nothing saved, the probe file removed
