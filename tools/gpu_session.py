"""The GPU measurements of issue 12 as one prepared, time-boxed command for a lent H100/H200 (offline machine).

Two steps, the first here, the second on the device::

    python -m tools.gpu_session prepare     # here: needs the package registry, not a GPU
    python3 -m tools.gpu_session run        # on the device, from the repository root

``prepare`` fills ``.gpu_session/`` in the repository root (listed in ``.git/info/exclude``, so it never gets
committed; the device tool carries it with ``carry: [".gpu_session"]``):

* ``shared/models/flan-t5-base``: the config and tokenizer of ``../shared/models/flan-t5-base`` (no weights: the
  benchmark and the GPU check build the architecture with random weights);
* ``shared/data/dialogsum/dialogsum.dev.jsonl``: the 500-row DialogSum dev file (CC BY-NC-SA 4.0, not committed);
* ``wheels/``: the packages the device image lacks or has in other versions (:data:`WHEELS`: transformers,
  accelerate and peft as pinned here, DeepSpeed and rouge_score built here from their source releases, and their
  dependencies), for the device's Python 3.12 on x86-64.

``run`` needs nothing from outside the machine. It first checks ``python3 -c 'import torch;
print(torch.cuda.is_available())'`` and stops with a message saying what is missing when there is no CUDA GPU or
torch; it installs the wheels into ``/tmp/site`` (``PYTHONPATH``), then runs, each phase time-boxed from one
deadline (``--seconds``, default 560: the device tool's 600-s limit minus a margin):

1. ``scripts/benchmark.py --quick`` on the GPU: the reference loop, the default path (``single_gpu.yaml``: bf16,
   compiled, length buckets) with the eval test, eager bf16 and fp32 (TF32), compiled fp32, compiled without
   buckets, LoRA, token budgets of 16k and 64k tokens; compile time on its own;
2. ``scripts/gpu_check.py`` for every launch path as shipped (single GPU, ZeRO-2, ZeRO-3 with ``zero3 lora`` run
   to completion, FSDP with one process; full and LoRA; gradient checkpointing), four runs at a time;
3. with the time left, the benchmark's other GPU cases (LoRA eager, ZeRO-2, random batches, gradient
   checkpointing).

Results land in ``$OUT`` (``--out``) as they come, at most 8 files (the device tool brings back 8): ``env.json``,
``session.log``, ``bench_gpu.json`` + ``bench_gpu.txt``, ``gpu_check.json`` + ``gpu_check.md``,
``bench_gpu_extra.json`` and ``failures.txt`` (the last lines of every failed run). docs/benchmarks.md says how to
run it and where its figures go.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools import REPO

SESSION = REPO / ".gpu_session"
SITE = Path("/tmp/site")


@dataclass(frozen=True)
class Layout:
    """Where the carried files are (``root``: ``.gpu_session`` of the repository)."""

    root: Path = SESSION

    @property
    def model(self) -> Path:
        """flan-t5-base's config and tokenizer."""
        return self.root / "shared" / "models" / "flan-t5-base"

    @property
    def data(self) -> Path:
        """The DialogSum dev file."""
        return self.root / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"

    @property
    def wheels(self) -> Path:
        """Wheels to install on the device."""
        return self.root / "wheels"


DEFAULT_LAYOUT = Layout()

#: Wheels for the device (Python 3.12, x86-64), as ``name==version``: what the image lacks (DeepSpeed, pydantic,
#: hjson, rouge_score, nltk, defusedxml) or holds in other versions than this project's (transformers,
#: accelerate, peft, regex, typing_extensions).
WHEELS = (
    "transformers==5.24.0",
    "accelerate==1.16.0",
    "peft==0.21.2",
    "hjson==3.1.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
    "nltk==3.10.4",
    "defusedxml==0.7.1",
    "regex==2026.11.19",
)
#: Released as source only: built into wheels here (pure Python; DeepSpeed compiles its ops at first use).
BUILT_HERE = ("deepspeed==0.19.8", "rouge_score==0.1.2")
#: The flan-t5-base files that travel: config and tokenizer (no weights).
MODEL_FILES = ("config.json", "generation_config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")
MODEL_FILES += ("special_tokens_map.json",)

#: The benchmark's GPU cases beyond --quick (phase 3).
EXTRA_CASES = (
    "lora-grouped-bf16",
    "zero2-full-grouped-bf16-compiled",
    "full-random-bf16-compiled",
    "full-grouped-bf16-compiled-gc",
)


# --------------------------------------------------------------------------------------------- prepare (here)


def prepare(shared: Path, layout: Layout = DEFAULT_LAYOUT, skip_wheels: bool = False) -> list[str]:
    """Fill ``.gpu_session/`` (model files, dev data, wheels); returns the lines to print."""
    source_model = shared / "models" / "flan-t5-base"
    source_data = shared / "data" / "dialogsum" / "dialogsum.dev.jsonl"
    for path in (source_model / "config.json", source_data):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found (the ../shared folder of this checkout)")
    layout.model.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (source_model / name).is_file():
            shutil.copyfile(source_model / name, layout.model / name)
    layout.data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_data, layout.data)
    exclude = REPO / ".git" / "info" / "exclude"
    listed = exclude.read_text() if exclude.exists() else ""
    if layout.root == SESSION and exclude.parent.is_dir() and "/.gpu_session/" not in listed:
        with open(exclude, "a", encoding="utf-8") as fh:
            fh.write("/.gpu_session/\n")
    if not skip_wheels:
        layout.wheels.mkdir(parents=True, exist_ok=True)
        platforms = [
            f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
        ]
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12", "--implementation=cp"]
            + platforms
            + ["-d", str(layout.wheels), *WHEELS],
            check=True,
        )
        # DS_BUILD_OPS=0: a pure-Python DeepSpeed wheel; its ops are compiled on the device at first use
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        subprocess.run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(layout.wheels), *BUILT_HERE],
            check=True,
            env=env,
        )
    size = sum(p.stat().st_size for p in layout.root.rglob("*") if p.is_file()) / 1e6
    return [
        f"prepared {layout.root} ({size:.1f} MB; the device tool carries at most 64 MB with the repository)",
        'on the device (run tool), with carry [".gpu_session"] and timeout_s 600:',
        "  python3 -m tools.gpu_session run",
    ]


# --------------------------------------------------------------------------------------------- run (device)


class Session:
    """The run on the device: one deadline, a log, and the files in ``out``."""

    def __init__(self, out: Path, seconds: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + seconds
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "session.log"
        self.failures = out / "failures.txt"

    def left(self) -> float:
        """Seconds left until the deadline."""
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        """A line to stdout and ``session.log``."""
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def run(self, name: str, cmd: list[str], seconds: float, env: dict[str, str]) -> tuple[int, str]:
        """Run one phase for at most ``seconds``; its output goes to the log (tail) and, on failure, to
        ``failures.txt``. Returns (exit code, output); 124 when the time box ran out."""
        seconds = max(10.0, min(seconds, self.left()))
        self.log(f"{name}: {' '.join(cmd)} (at most {seconds:.0f} s)")
        started = time.monotonic()
        # its own process group, so that the time box also ends what it started (launchers, case processes)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO),
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=seconds)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = 124
        self.log(f"{name}: exit code {code} after {time.monotonic() - started:.0f} s")
        tail = "\n".join(output.splitlines()[-40:])
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(tail + "\n")
        if code != 0:
            with open(self.failures, "a", encoding="utf-8") as fh:
                fh.write(f"===== {name} (exit code {code})\n{tail}\n")
        return code, output


def check_environment(session: Session, layout: Layout) -> dict[str, str] | None:
    """Check python3/torch/CUDA, install the carried wheels; returns the environment for the phases, or None when
    the machine cannot run them (the reason is in ``env.json`` and the log)."""
    info: dict[str, object] = {"python": sys.version.split()[0], "executable": sys.executable}
    probe = "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    info["torch_probe"] = (proc.stdout + proc.stderr).strip()[-500:]
    ok = proc.returncode == 0 and proc.stdout.strip().endswith("True")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.update(PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR="/tmp/torch_extensions")
    if ok and layout.wheels.is_dir():
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        install += [
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(SITE),
            *map(str, sorted(layout.wheels.glob("*.whl"))),
        ]
        done = subprocess.run(install, capture_output=True, text=True)
        info["wheels"] = "installed" if done.returncode == 0 else f"FAILED: {done.stderr.strip()[-500:]}"
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        info["wheels"] = "none carried (.gpu_session/wheels missing)" if ok else "not installed"
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if ok:
        versions = (
            "import importlib.metadata as m, torch\n"
            "for n in ('transformers','accelerate','peft','deepspeed','rouge_score','huggingface_hub','tokenizers'):\n"
            "    try: print(n, m.version(n))\n"
            "    except Exception as e: print(n, 'MISSING', type(e).__name__)\n"
            "print('gpu', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))\n"
            "import tools.benchmark, dialogsum.metrics\n"
        )
        proc = subprocess.run([sys.executable, "-c", versions], capture_output=True, text=True, env=env, cwd=str(REPO))
        info["packages"] = (proc.stdout + proc.stderr).strip()[-2000:]
        ok = proc.returncode == 0
    if not ok:
        info["needs"] = (
            "python3 with a CUDA build of torch that sees a GPU, and the project's packages: run "
            "`python -m tools.gpu_session prepare` on a machine with the package registry and carry "
            ".gpu_session (wheels for transformers, accelerate, peft, deepspeed, rouge_score, ...)"
        )
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        info["nvidia_smi"] = subprocess.run([smi, query, "--format=csv"], capture_output=True, text=True).stdout.strip()
    (session.out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    session.log(f"environment: {'ok' if ok else 'NOT usable'}: {info.get('torch_probe')}; wheels {info['wheels']}")
    return env if ok else None


def phases(out: Path, tmp: Path, layout: Layout = DEFAULT_LAYOUT) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the time left when it starts) of the run, in order."""
    data = ["--model_dir", str(layout.model), "--data_file", str(layout.data)]
    bench = [sys.executable, "scripts/benchmark.py", *data, "--steps", "10", "--warmup_steps", "3"]
    bench += ["--worker_timeout_s", "150"]
    return [
        ("benchmark", [*bench, "--quick", "--output_json", str(out / "bench_gpu.json")], 0.5),
        (
            "gpu_check",
            [sys.executable, "scripts/gpu_check.py", *data, "--steps", "20", "--timeout", "240", "--parallel", "4"]
            + ["--work_dir", str(tmp / "gpu_check")],
            0.85,
        ),
        (
            "benchmark_extra",
            [*bench, "--full_grid", "--only", *EXTRA_CASES, "--output_json", str(out / "bench_gpu_extra.json")],
            1.0,
        ),
    ]


def run(out: Path, seconds: float, tmp: Path, layout: Layout = DEFAULT_LAYOUT) -> int:
    """The device run (see the module docstring); returns the exit code (0: every phase ran and passed; 2: the
    carried files are missing; 3: no usable torch/CUDA/packages; else the first failing phase's code)."""
    session = Session(out, seconds)
    session.log(f"gpu session in {REPO}, results in {out}, deadline in {seconds:.0f} s")
    for path in (layout.model / "config.json", layout.data):
        if not path.is_file():
            session.log(f"error: {path} missing: run `python -m tools.gpu_session prepare` first")
            return 2
    env = check_environment(session, layout)
    if env is None:
        return 3
    worst = 0
    for name, cmd, share in phases(out, tmp, layout):
        if session.left() < 30:
            session.log(f"{name}: skipped, {session.left():.0f} s left")
            worst = worst or 4
            continue
        code, output = session.run(name, cmd, session.left() * share, env)
        if name == "benchmark":
            (out / "bench_gpu.txt").write_text(output[-20000:])
        if name == "gpu_check":
            for file in ("gpu_check.json", "gpu_check.md"):
                if (tmp / "gpu_check" / file).is_file():
                    shutil.copy2(tmp / "gpu_check" / file, out / file)
        worst = worst or code
    session.log(f"done, exit code {worst}")
    return worst


def main(argv: list[str] | None = None) -> None:
    """``prepare`` (here) or ``run`` (on the device)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="copy model/data files and fetch wheels into .gpu_session/ (here)")
    p.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared folder with models/ and data/")
    p.add_argument("--skip_wheels", action="store_true", help="copy the files only")
    p.add_argument("--root", default=str(SESSION), help="the folder to fill (carried to the device)")
    r = sub.add_parser("run", help="the measurements (on the device)")
    r.add_argument("--out", default=os.environ.get("OUT", "gpu_session_out"), help="results folder (default $OUT)")
    r.add_argument("--seconds", type=float, default=560.0, help="deadline for the whole run")
    r.add_argument("--tmp", default="/tmp/dialogsum_gpu_session", help="work folder (checkpoints, models)")
    r.add_argument("--root", default=str(SESSION), help="the carried folder prepare filled")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print("\n".join(prepare(Path(args.shared), Layout(Path(args.root)), args.skip_wheels)))
        return
    sys.exit(run(Path(args.out), args.seconds, Path(args.tmp), Layout(Path(args.root))))


if __name__ == "__main__":
    main()
