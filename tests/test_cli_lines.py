"""The few behaviours of issue 19 that only a real process shows: a shell's ``<(zcat ...)`` as a data file,
``--max_time`` too short for one step, online W&B without a network. Run together, two at a time."""

from __future__ import annotations

import gzip
import json
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

FLAGS = ("--max_source_length", "64", "--max_new_tokens", "8", "--report_to", "none")


def _closed_port() -> int:
    with socket.socket() as probe:  # bound then released: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> dict[str, tuple]:
    """Each case's process and output folder."""
    model, data = quickstart_assets
    root = tmp_path_factory.mktemp("cli_lines")
    (root / "test.jsonl.gz").write_bytes(gzip.compress((data / "test.jsonl").read_bytes()))
    python = shlex.quote(sys.executable)
    evaluate = shlex.join(
        [str(REPO / "scripts" / "evaluate.py"), "--model_name_or_path", str(model), "--output_dir", str(root / "ev")]
    )
    train = [
        str(REPO / "scripts" / "train_full.py"),
        *("--model_name_or_path", str(model), "--train_file", str(data / "train.jsonl")),
        *("--test_file", str(data / "test.jsonl"), "--max_train_steps", "2", *FLAGS),
    ]
    cases = {
        # bash: <(...) is /dev/fd/N, a pipe without a file name's format
        "process substitution": (
            [
                "bash",
                "-c",
                f"{python} {evaluate} {' '.join(FLAGS)} --max_test_samples 3 "
                f"--test_file <(zcat {shlex.quote(str(root / 'test.jsonl.gz'))})",
            ],
            root / "ev",
            {},
        ),
        "max_time too short": ([sys.executable, *train, "--output_dir", str(root / "mt"), "--max_time", "1"], None, {}),
        "wandb without network": (
            [sys.executable, *train, "--output_dir", str(root / "wb"), "--report_to", "wandb"],
            root / "wb",
            {
                "WANDB_MODE": "online",
                "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
                "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
            },
        ),
    }

    def run(case: tuple) -> subprocess.CompletedProcess:
        command, _, env = case
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(root),
            env=subprocess_env(OMP_NUM_THREADS="1", **env),
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, case) for name, case in cases.items()}
        return {name: (future.result(), cases[name][1]) for name, future in futures.items()}


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_a_gzipped_test_file_through_process_substitution(runs: dict[str, tuple]) -> None:
    proc, out = runs["process substitution"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and json.loads((out / "metrics.json").read_text())["rouge1"] >= 0


def test_max_time_too_short_for_one_step_is_an_error_not_a_restart_loop(runs: dict[str, tuple]) -> None:
    proc, _ = runs["max_time too short"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # not 75 (EXIT_STOPPED: "continue with latest")
    errors = _errors(proc)
    assert len(errors) == 1 and errors[0].startswith("error: --max_time 1 s leaves no time for one optimizer step")
    assert "no progress is possible" in errors[0] and "stopped:" not in proc.stderr


def test_wandb_online_without_network_is_one_line_and_writes_nothing(runs: dict[str, tuple]) -> None:
    proc, out = runs["wandb without network"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "--report_to wandb: the W&B server http://127.0.0.1:" in errors[0]
    assert "cannot be reached" in errors[0] and "AttributeError" not in proc.stderr
    assert not out.exists()  # refused before the output folder was made
