"""Soak test of stopping and resuming: real training runs interrupted at random moments, restarted until done.

Each *setup* (full or LoRA, one or two processes) trains the quick-start tiny T5 with dropout switched on (so a
slip in the RNG restore changes the weights) for :data:`TRAIN_FLAGS`, once without interruption (the
reference), then in *chains*: the same command with ``--resume_from_checkpoint latest`` is started, interrupted
at a random moment by SIGKILL (the machine is gone: the launcher and every rank at once) or SIGTERM (a spot
notice, a scheduler; for two processes sent to the launcher, to one rank or to every rank), and started again,
until a run ends on its own. After every interruption every complete checkpoint on disk must load (each file
read in full); at the end of a chain the trained weights must equal the reference's bit for bit, and so must
its log (step, loss, learning rate, grad norm) and ``train_loss``.

One process runs as ``python scripts/train_<method>.py`` (fp32 on the CPU), two through ``accelerate launch
--config_file accelerate_configs/multi_cpu.yaml`` (gloo). ``scripts/soak.py`` runs it (20 SIGKILLs and 20
SIGTERMs by default); ``tests/test_preemption.py`` runs a short version.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dialogsum.errors import ConfigError
from dialogsum.files import write_json
from tools import REPO

KINDS = ("SIGKILL", "SIGTERM")
#: The training every setup runs: 24 rows in batches of 4, 2 micro-batches per optimizer step (one process: 3
#: steps per epoch; two: 2), 60 steps, a checkpoint every 3 steps and a log line every 4 (log windows straddle
#: checkpoints).
TRAIN_FLAGS = {
    "max_train_samples": "24",
    "per_device_train_batch_size": "4",
    "gradient_accumulation_steps": "2",
    "max_train_steps": "60",
    "checkpointing_steps": "3",
    "logging_steps": "4",
    "max_source_length": "64",
    "max_target_length": "24",
    "report_to": "none",
    "do_eval": "false",
}
LEARNING_RATE = {"full": "3e-3", "lora": "1e-2"}
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}
LOG_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm")
#: A chain that has not finished after this many starts is a failure (a run that never completes).
MAX_STARTS = 12
#: Share of the interruptions aimed at the start-up (imports, loading) rather than at the training loop.
STARTUP_SHARE = 0.1


@dataclass(frozen=True)
class Setup:
    """What is trained and how it is launched."""

    method: str
    processes: int

    @property
    def name(self) -> str:
        """``full-1p``, ``lora-2p``, ..."""
        return f"{self.method}-{self.processes}p"


#: In this order SIGKILLs are dealt out from the first setup and SIGTERMs from the third, so that 2 + 2 already
#: covers both methods, both process counts and both signals.
SETUPS = (Setup("full", 1), Setup("lora", 2), Setup("lora", 1), Setup("full", 2))


@dataclass
class Reference:
    """The uninterrupted run of a setup, and its timeline (to aim the interruptions at the training)."""

    setup: Setup
    out: Path
    startup_s: float
    """Process start until the training loop began (``log_history.jsonl`` created)."""
    train_s: float
    """Training loop start until its last log line (the loop's duration)."""


@dataclass
class Attempt:
    """One start of a chain's command."""

    kind: str | None
    """The signal sent, or None (left to finish)."""
    target: str
    """Who got it: ``process``, ``launcher``, ``rank 0``, ``rank 1``, ``every rank``, ``launcher and ranks``."""
    delay_s: float
    exit_code: int | None = None
    exit_after_signal_s: float | None = None
    sent: bool = False
    """Whether the signal went out before the run ended on its own."""
    latest: str | None = None
    """The newest complete checkpoint afterwards."""
    stop_line: str | None = None
    """The ``stopped:`` line of a graceful stop."""
    damaged: list[str] = field(default_factory=list)
    """Complete checkpoints on disk afterwards that cannot be read in full."""
    problems: list[str] = field(default_factory=list)
    """Unexpected outcomes (an exit code, a stop line, a run that never ended)."""


@dataclass
class Chain:
    """Starts of one command until it finished on its own, and how the result compares with the reference."""

    setup: str
    attempts: list[Attempt] = field(default_factory=list)
    identical: bool = False
    max_abs_diff: float | None = None
    log_equal: bool = False
    train_loss_equal: bool = False
    checkpoints_checked: int = 0

    @property
    def problems(self) -> list[str]:
        """Everything wrong with this chain (empty: it passed)."""
        found = [p for a in self.attempts for p in a.damaged + a.problems]
        if not self.identical:
            found.append(f"{self.setup}: weights differ from the reference (max |diff| {self.max_abs_diff})")
        if not self.log_equal:
            found.append(f"{self.setup}: log differs from the reference")
        if not self.train_loss_equal:
            found.append(f"{self.setup}: train_loss differs from the reference")
        return found


# --------------------------------------------------------------------------------------------- runs


def dropout_copy(model_dir: Path, dest: Path) -> Path:
    """A copy of a T5 model folder with dropout 0.1 (so that a slip in the RNG restore changes the weights)."""
    if not dest.is_dir():
        shutil.copytree(model_dir, dest)
        config = json.loads((dest / "config.json").read_text())
        write_json(dest / "config.json", {**config, "dropout_rate": 0.1})
    return dest


def prepare_assets(root: Path) -> tuple[Path, Path]:
    """The quick-start tiny T5 (with dropout) and its synthetic data, under ``root``."""
    from dialogsum.quickstart import build_quickstart_assets

    model_dir, data_dir = build_quickstart_assets(root / "assets", seed=0)
    return dropout_copy(model_dir, root / "tiny-t5-dropout"), data_dir


def command(setup: Setup, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The training command of ``setup`` (``extra``: more flags, e.g. ``--resume_from_checkpoint latest``)."""
    flags = {
        "model_name_or_path": str(model),
        "train_file": str(data / "train.jsonl"),
        "output_dir": str(out),
        "learning_rate": LEARNING_RATE[setup.method],
        **TRAIN_FLAGS,
    }
    args = [*(a for k, v in flags.items() for a in (f"--{k}", v)), *extra]
    script = str(REPO / "scripts" / f"train_{setup.method}.py")
    if setup.processes == 1:
        return [sys.executable, script, *args]
    config = str(REPO / "accelerate_configs" / "multi_cpu.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    return [*launch, "--num_processes", str(setup.processes), script, *args]


def environment(**extra: str) -> dict[str, str]:
    """Offline, no W&B unless asked, one thread per process (a tiny model runs fastest so), repo importable."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": env.get("WANDB_MODE", "disabled"),
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(extra)
    return env


def run_reference(setup: Setup, model: Path, data: Path, out: Path, env: dict[str, str] | None = None) -> Reference:
    """Train ``setup`` without interruption into ``out``; raises RuntimeError if it fails."""
    started = time.monotonic()
    history = out / "log_history.jsonl"
    with open(out.parent / f"{out.name}.stderr", "w") as err:
        proc = subprocess.Popen(command(setup, model, data, out), stdout=subprocess.DEVNULL, stderr=err, env=env)
        loop_at = last_line_at = None
        size = 0
        while proc.poll() is None:
            if history.exists():
                loop_at = loop_at or time.monotonic()
                if history.stat().st_size > size:
                    size, last_line_at = history.stat().st_size, time.monotonic()
            time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run {setup.name} failed ({proc.returncode}); see {out}.stderr")
    loop_at = loop_at or time.monotonic()
    return Reference(setup, out, startup_s=loop_at - started, train_s=(last_line_at or loop_at) - loop_at)


def _tree(proc: subprocess.Popen) -> list[Any]:
    """The launcher and its training processes (ranks in pid order)."""
    import psutil

    try:
        return [psutil.Process(proc.pid), *sorted(psutil.Process(proc.pid).children(), key=lambda c: c.pid)]
    except psutil.NoSuchProcess:
        return []


def _send(proc: subprocess.Popen, kind: str, target: str) -> bool:
    """Send ``kind`` to ``target`` of a running command; False if it had ended already."""
    import psutil

    if proc.poll() is not None:
        return False
    number = getattr(signal, kind)
    tree = _tree(proc) if target != "process" else []
    chosen = {
        "process": [proc],
        "launcher": tree[:1],
        "rank 0": tree[1:2],
        "rank 1": tree[2:3],
        "every rank": tree[1:],
        "launcher and ranks": tree,
    }[target]
    sent = False
    for p in chosen:
        try:
            p.send_signal(number)
            sent = True
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return sent


#: What the main process prints on stderr when the training loop starts (its progress bar).
LOOP_STARTED = "training:"


def start_and_interrupt(
    cmd: list[str],
    kind: str | None,
    target: str,
    delay_s: float,
    env: dict[str, str],
    stderr_path: Path,
    after: str | None = LOOP_STARTED,
    when: Callable[[], bool] | None = None,
    timeout_s: float = 300,
) -> Attempt:
    """Start ``cmd``; ``delay_s`` after ``after`` appears on its stderr (None: after the start), or once
    ``when()`` holds, send ``kind`` to ``target``; wait for the end."""
    attempt = Attempt(kind=kind, target=target, delay_s=round(delay_s, 3))
    with open(stderr_path, "w") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(REPO))
        sent_at = None
        clock_from = started if after is None else None
        while proc.poll() is None and time.monotonic() - started < timeout_s:
            if clock_from is None and after in stderr_path.read_text(errors="replace"):
                clock_from = time.monotonic()
            if when is not None:
                due = when()
            else:
                due = clock_from is not None and time.monotonic() - clock_from >= delay_s
            if kind is not None and sent_at is None and due:
                attempt.sent = _send(proc, kind, target)
                sent_at = time.monotonic()
                if not attempt.sent:
                    break
            time.sleep(0.005)
        if proc.poll() is None and time.monotonic() - started >= timeout_s:
            for p in reversed(_tree(proc)):
                p.kill()
            attempt.problems.append(f"{' '.join(cmd[-4:])}: no exit after {timeout_s:.0f} s (killed)")
        proc.wait()
    attempt.exit_code = proc.returncode
    if sent_at is not None and attempt.sent:
        attempt.exit_after_signal_s = round(time.monotonic() - sent_at, 3)
    text = stderr_path.read_text(errors="replace")
    stops = [line for line in text.splitlines() if line.startswith("stopped: ")]
    attempt.stop_line = stops[-1] if stops else None
    if len(stops) > 1:
        attempt.problems.append(f"{len(stops)} 'stopped:' lines instead of one")
    return attempt


# --------------------------------------------------------------------------------------------- checks


def check_checkpoints(root: Path, processes: int) -> tuple[int, list[str]]:
    """Read every complete checkpoint in ``root`` in full; returns (how many, problems found)."""
    import torch
    from safetensors.torch import load_file

    from dialogsum.checkpointing import STATE_FILE, check_checkpoint_files, checkpoint_dirs, read_state
    from dialogsum.errors import UserError

    problems, folders = [], checkpoint_dirs(root)
    for folder in folders:
        try:
            check_checkpoint_files(folder)
            state = read_state(folder)
            if f"checkpoint-{state.step}" != folder.name:
                problems.append(f"{folder}: {STATE_FILE} says step {state.step}")
            needed = ["model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"]
            needed += [f"rng_state_{r}.pkl" for r in range(processes)]
            problems += [f"{folder}: {name} missing" for name in needed if not (folder / name).is_file()]
            load_file(str(folder / "model.safetensors"))
            torch.load(folder / "optimizer.bin", weights_only=True)
        except (UserError, OSError, RuntimeError, ValueError) as exc:
            problems.append(f"{folder}: {str(exc).splitlines()[0][:200]}")
    return len(folders), problems


def _log(out: Path) -> list[dict[str, Any]]:
    lines = (out / "log_history.jsonl").read_text().splitlines()
    return [{k: e.get(k) for k in LOG_KEYS} for e in map(json.loads, lines) if "loss" in e]


def compare_with_reference(out: Path, ref: Path, method: str) -> tuple[bool, float | None, bool, bool]:
    """(weights identical, max |difference|, logs equal, train_loss equal) of two finished runs."""
    from safetensors.torch import load_file

    try:
        got, want = load_file(str(out / WEIGHTS[method])), load_file(str(ref / WEIGHTS[method]))
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False, None, False, False
    if got.keys() != want.keys():
        return False, None, False, False
    diff = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    identical = all(got[k].equal(want[k]) for k in want)
    same_loss = metrics.get("train_loss") == json.loads((ref / "metrics.json").read_text()).get("train_loss")
    return identical, diff, _log(out) == _log(ref), same_loss


# --------------------------------------------------------------------------------------------- chains


def _targets(setup: Setup, kind: str) -> list[str]:
    if setup.processes == 1:
        return ["process"]
    if kind == "SIGKILL":
        return ["launcher and ranks"]  # the machine is gone
    return ["launcher", "rank 0", "rank 1", "every rank"]


def _latest_step(root: Path) -> int:
    from dialogsum.checkpointing import find_latest

    latest = find_latest(root)
    return int(latest.name.split("-")[1]) if latest else 0


def run_chain(
    ref: Reference, kinds: list[str], model: Path, data: Path, out: Path, rng: random.Random, env: dict[str, str]
) -> tuple[Chain, list[str]]:
    """Start, interrupt (one of ``kinds`` per start, in order) and restart until the run ends on its own.

    Returns the chain and the kinds not used (the run finished before their signal went out).
    """
    setup = ref.setup
    chain = Chain(setup=setup.name)
    cmd = command(setup, model, data, out, "--resume_from_checkpoint", "latest")
    total = int(TRAIN_FLAGS["max_train_steps"])
    pending = list(kinds)
    while len(chain.attempts) < MAX_STARTS:
        left = 1 - _latest_step(out) / total
        kind = pending[0] if pending and left > 0 else None  # nothing left to train: let it finish
        if rng.random() < STARTUP_SHARE:  # while loading: nothing to save yet
            after, delay = None, rng.uniform(0, ref.startup_s)
        else:
            after, delay = LOOP_STARTED, rng.uniform(0, ref.train_s * left)
        target = rng.choice(_targets(setup, kind)) if kind else "-"
        log_path = out.parent / f"{out.name}.start{len(chain.attempts) + 1}.stderr"
        attempt = start_and_interrupt(cmd, kind, target, delay, env, log_path, after=after)
        chain.attempts.append(attempt)
        if kind is not None and attempt.sent:
            pending.pop(0)
        found, attempt.damaged = check_checkpoints(out, setup.processes)
        chain.checkpoints_checked += found
        latest = _latest_step(out)
        attempt.latest = f"checkpoint-{latest}" if latest else None
        _check_outcome(attempt, setup, latest)
        if attempt.exit_code == 0:
            break
    else:
        chain.attempts[-1].problems.append(f"{setup.name}: not finished after {MAX_STARTS} starts")
    identical, diff, log_equal, loss_equal = compare_with_reference(out, ref.out, setup.method)
    chain.identical, chain.max_abs_diff, chain.log_equal, chain.train_loss_equal = (
        identical,
        diff,
        log_equal,
        loss_equal,
    )
    return chain, pending


def _check_outcome(attempt: Attempt, setup: Setup, latest: int) -> None:
    """A graceful stop exits with 75 (one process; every rank behind a launcher) and names the newest checkpoint."""
    from dialogsum.preemption import EXIT_STOPPED

    if attempt.stop_line is None:
        return
    if setup.processes == 1 and attempt.exit_code != EXIT_STOPPED:
        attempt.problems.append(f"stopped, but exit code {attempt.exit_code} instead of {EXIT_STOPPED}")
    if latest and f"checkpoint-{latest} saved" not in attempt.stop_line and "nothing to save" not in attempt.stop_line:
        attempt.problems.append(f"stop line does not name the newest checkpoint-{latest}: {attempt.stop_line}")


@dataclass
class SoakReport:
    """Everything a soak did and found."""

    chains: list[Chain]
    seconds: float
    seed: int

    def interruptions(self, kind: str) -> list[Attempt]:
        """The attempts that really got ``kind`` before they ended."""
        return [a for c in self.chains for a in c.attempts if a.kind == kind and a.sent]

    @property
    def problems(self) -> list[str]:
        """Every problem of every chain (empty: the soak passed)."""
        return [p for c in self.chains for p in c.problems]

    def summary(self) -> dict[str, Any]:
        """Figures for docs/preemption.md: counts, outcomes, stop latencies, verdict."""
        terms = self.interruptions("SIGTERM")
        graceful = [a for a in terms if a.stop_line and "saved" in a.stop_line]
        latencies = sorted(a.exit_after_signal_s for a in graceful if a.exit_after_signal_s is not None)
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "chains": len(self.chains),
            "starts": sum(len(c.attempts) for c in self.chains),
            "sigkill": len(self.interruptions("SIGKILL")),
            "sigterm": len(terms),
            "sigterm_stopped_with_checkpoint": len(graceful),
            "sigterm_before_or_after_the_loop": len(terms) - len([a for a in terms if a.stop_line]),
            "stop_exit_s_median": latencies[len(latencies) // 2] if latencies else None,
            "stop_exit_s_max": latencies[-1] if latencies else None,
            "checkpoints_checked": sum(c.checkpoints_checked for c in self.chains),
            "corrupt_checkpoints": sum(len(a.damaged) for c in self.chains for a in c.attempts),
            "identical_to_reference": sum(c.identical and c.log_equal and c.train_loss_equal for c in self.chains),
            "problems": self.problems,
        }


def plan(kills: int, terms: int, setups: tuple[Setup, ...], rng: random.Random) -> dict[Setup, list[str]]:
    """Deal ``kills`` SIGKILLs (from the first setup on) and ``terms`` SIGTERMs (from the middle one on) out to
    ``setups`` in turn, so each setup gets both kinds as evenly as possible; each setup's list is shuffled."""
    n = len(setups)
    per_setup: dict[Setup, list[str]] = {s: [] for s in setups}
    for i in range(kills):
        per_setup[setups[i % n]].append("SIGKILL")
    for i in range(terms):
        per_setup[setups[(i + n // 2) % n]].append("SIGTERM")
    for queue in per_setup.values():
        rng.shuffle(queue)
    return per_setup


def soak(
    workdir: Path,
    kills: int = 20,
    terms: int = 20,
    setups: tuple[Setup, ...] = SETUPS,
    seed: int = 0,
    per_chain: int = 3,
    assets: tuple[Path, Path] | None = None,
    references: dict[Setup, Reference] | None = None,
    progress: Callable[[str], None] = print,
) -> SoakReport:
    """Run the soak in ``workdir``: a reference per setup (unless given), then chains of at most ``per_chain``
    interruptions until every planned interruption has really happened."""
    started = time.monotonic()
    rng = random.Random(seed)
    model, data = assets or prepare_assets(workdir)
    env = environment()
    references = dict(references or {})
    chains: list[Chain] = []
    for setup, queue in plan(kills, terms, setups, rng).items():
        if setup not in references:
            out = workdir / f"{setup.name}-reference"
            references[setup] = run_reference(setup, model, data, out, env)
            progress(f"{setup.name}: reference in {references[setup].startup_s + references[setup].train_s:.1f} s")
        number = 0
        while queue:
            number += 1
            out = workdir / f"{setup.name}-chain{number}"
            chain, unused = run_chain(references[setup], queue[:per_chain], model, data, out, rng, env)
            queue = unused + queue[per_chain:]
            chains.append(chain)
            outcome = ", ".join(f"{a.kind or 'end'}->{a.exit_code}" for a in chain.attempts)
            verdict = "identical" if not chain.problems else "; ".join(chain.problems)
            progress(f"{setup.name} chain {number}: {outcome}: {verdict}")
    return SoakReport(chains=chains, seconds=time.monotonic() - started, seed=seed)


def report_json(report: SoakReport) -> str:
    """The summary and every chain, as JSON."""
    return json.dumps({"summary": report.summary(), "chains": [asdict(c) for c in report.chains]}, indent=2)


# --------------------------------------------------------------------------------------------- command line


def _flag(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class SoakArgs:
    """The flags of ``scripts/soak.py`` (``HfArgumentParser`` reads them)."""

    workdir: str = field(metadata={"help": "Folder for the runs (created; must be empty or absent)."})
    kills: int = _flag(20, "SIGKILLs to deliver (the launcher and every rank at once).")
    terms: int = _flag(20, "SIGTERMs to deliver (two processes: to the launcher, one rank or every rank).")
    setups: str = _flag(",".join(s.name for s in SETUPS), "Comma-separated setups: full-1p, lora-1p, full-2p, lora-2p.")
    per_chain: int = _flag(3, "Interruptions per chain before a run may finish.")
    seed: int = _flag(0, "Seed of the plan, the moments and the targets of the interruptions.")
    output_json: str | None = _flag(None, "Write the summary and every chain here (JSON).")


def parse_args(argv: list[str] | None = None) -> SoakArgs:
    """Parse and check the flags (a bad one is a :class:`ConfigError`, exit code 2)."""
    import argparse
    from typing import NoReturn

    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> NoReturn:  # type: ignore[override]
            raise ConfigError(f"{message} (see --help)")

    parser = Parser(SoakArgs, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    (args,) = parser.parse_args_into_dataclasses(argv)
    known = {s.name for s in SETUPS}
    chosen = [name.strip() for name in args.setups.split(",") if name.strip()]
    if not chosen or any(name not in known for name in chosen):
        raise ConfigError(f"--setups must name some of {', '.join(sorted(known))}, got {args.setups!r}")
    if min(args.kills, args.terms) < 0 or args.kills + args.terms == 0 or args.per_chain < 1:
        raise ConfigError("--kills and --terms must be >= 0 (not both 0) and --per_chain >= 1")
    workdir = Path(args.workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ConfigError(f"--workdir {workdir} must be an empty folder or not exist yet")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the soak from the command line; print one line per chain and the summary; exit 1 on any problem."""
    from dialogsum.errors import UserError
    from dialogsum.files import write_text

    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setups = tuple(s for s in SETUPS if s.name in args.setups.split(","))
    report = soak(workdir, args.kills, args.terms, setups, args.seed, args.per_chain)
    summary = report.summary()
    if args.output_json:
        write_text(args.output_json, report_json(report) + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "problems"}, indent=2) + "\n")
    if summary["problems"]:
        raise UserError(f"soak found {len(summary['problems'])} problem(s): {'; '.join(summary['problems'][:5])}")
    return summary
