"""A run owns its output folder, and only what it wrote there (issue 19): lock, manifest, inputs, results that
belong to the final weights, a writer of regular files only."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

from dialogsum.comparison import compare_runs
from dialogsum.config import parse_config
from dialogsum.errors import UserError
from dialogsum.files import write_json, write_text
from dialogsum.results import check_results_belong, stamp_predictions, weights_fingerprint, weights_record
from dialogsum.run_folder import (
    LOCK_FILE,
    MANIFEST_FILE,
    acquire_lock,
    check_output_dir,
    read_manifest,
    release_output_dirs,
    start_output_dir,
    take_output_dir,
)

#: Holds the lock of a folder like a run does, prints "held", and waits to be killed.
HOLDER = """
import sys, time
from dialogsum.run_folder import take_output_dir
take_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _release() -> None:
    """Every test leaves no folder held by this process."""
    yield
    release_output_dirs()


def _config(out: Path, *extra: str, method: str = "lora"):
    return parse_config(["--output_dir", str(out), *extra], method)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# --------------------------------------------------------------------------------------------- lock


def test_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(UserError) as refused:
            check_output_dir(_config(out))
        message = str(refused.value)
        assert message.startswith(f"--output_dir {out} is in use by another run: pid {holder.pid} on host ")
        assert socket.gethostname() in message and " since 20" in message and "UTC" in message
        assert message.endswith("wait for it to end or choose another --output_dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = json.loads((out / LOCK_FILE).read_text())  # a killed run leaves its lock file behind
    assert lock["pid"] == holder.pid
    with caplog.at_level(logging.WARNING):
        assert check_output_dir(_config(out)) == out  # the kernel dropped the lock: taken over
    assert f"taking over the lock left by pid {holder.pid}" in caplog.text
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_output_dirs()
    assert os.listdir(out) == [MANIFEST_FILE]  # the lock file goes with the lock
    fresh = tmp_path / "fresh"
    check_output_dir(_config(fresh))
    release_output_dirs()
    assert not fresh.exists()  # created by the check and left empty: removed again


def test_lock_is_exclusive_per_open_file(tmp_path: Path) -> None:
    first = acquire_lock(tmp_path / LOCK_FILE, tmp_path, "--output_dir")
    with pytest.raises(UserError, match=f"pid {os.getpid()} on host"):
        acquire_lock(tmp_path / LOCK_FILE, tmp_path, "--output_dir")
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_lock(tmp_path / LOCK_FILE, tmp_path, "--output_dir").release()


def test_summarize_output_file_is_locked(tmp_path: Path) -> None:
    from dialogsum.run_folder import take_output_file

    target = tmp_path / "summaries.jsonl"
    take_output_file(target)
    assert (tmp_path / f".summaries.jsonl{LOCK_FILE}").is_file()
    with pytest.raises(UserError, match=f"--output_file {target} is in use by another run: pid {os.getpid()}"):
        acquire_lock(tmp_path / f".summaries.jsonl{LOCK_FILE}", target, "--output_file")
    release_output_dirs()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- manifest


def _finished_run(out: Path) -> None:
    """A folder as a finished run leaves it: its files, and the manifest listing them."""
    start_output_dir(_config(out))
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("metrics.json", "README.md", "config.json", "adapter_model.safetensors"):
        (out / name).write_text(name)
    release_output_dirs()


def test_a_folder_without_manifest_is_refused_whatever_the_flags_and_left_as_it_was(tmp_path: Path) -> None:
    for name in ("README.md", "config.json", "a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("mine")
    for name in ("plots", "wandb"):
        (tmp_path / name).mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for flags in ([], ["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]):
        with pytest.raises(UserError) as refused:
            check_output_dir(_config(tmp_path, *flags))
        assert str(refused.value) == (
            f"--output_dir {tmp_path} is not empty and is not a run folder (no {MANIFEST_FILE}: a run only ever "
            "writes into an empty folder or its own): it holds README.md, a.txt, b.txt, c.txt, config.json, ... "
            "(7 entries); choose another --output_dir"
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock file, no manifest left


def test_overwrite_removes_exactly_what_the_manifest_lists(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out)
    assert read_manifest(out) == {
        "README.md",
        "adapter_model.safetensors",
        "checkpoint-2",
        "config.json",
        "metrics.json",
    }
    (out / "notes.txt").write_text("mine")  # a person's files, added after the run
    (out / "plots").mkdir()
    with pytest.raises(UserError, match="is not empty; pass --overwrite_output_dir to replace the run in it"):
        check_output_dir(_config(out))
    cfg = _config(out, "--overwrite_output_dir")
    check_output_dir(cfg)
    assert (out / "metrics.json").exists()  # checking deletes nothing
    start_output_dir(cfg)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, MANIFEST_FILE, "notes.txt", "plots"])
    (out / "metrics.json").write_text("new")
    (out / "plots" / "x.png").write_bytes(b"png")  # written into the person's folder: still not the run's
    release_output_dirs()
    assert read_manifest(out) == {"metrics.json"}
    assert (out / "notes.txt").read_text() == "mine"


def test_an_export_replaces_the_previous_export_and_never_a_persons_file(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    start_output_dir(_config(out))
    (out / "model.safetensors").write_text("old")
    (out / "old_only.json").write_text("old")
    release_output_dirs()
    (out / "notes.txt").write_text("mine")
    built = tmp_path / ".merged.tmp-1"
    built.mkdir()
    (built / "model.safetensors").write_text("new")
    (built / "config.json").write_text("{}")
    folder = take_output_dir(out)
    assert folder is not None
    folder.move_in(built)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == [
        MANIFEST_FILE,
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert (out / "model.safetensors").read_text() == "new" and not built.exists()
    release_output_dirs()
    built.mkdir()
    (built / "notes.txt").write_text("the card")
    with pytest.raises(UserError, match=f"--output_dir {out} holds notes.txt, which no run wrote and this one would"):
        take_output_dir(out).move_in(built)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").exists()


def test_a_manifest_names_only_entries_of_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "precious").write_text("keep")
    (out / "metrics.json").write_text("{}")
    manifest = {"format": 1, "entries": ["../precious", "/etc/passwd", "..", "metrics.json", LOCK_FILE]}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(out) == {"metrics.json"}
    cfg = _config(out, "--overwrite_output_dir")
    check_output_dir(cfg)
    start_output_dir(cfg)
    assert (tmp_path / "precious").read_text() == "keep" and not (out / "metrics.json").exists()
    (out / MANIFEST_FILE).write_text("[1, 2")
    release_output_dirs()


def test_a_damaged_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / MANIFEST_FILE).write_text('{"entries": "all"}')
    with pytest.raises(UserError, match=f"its {MANIFEST_FILE} .* cannot be read .entries is not a list of names"):
        check_output_dir(_config(tmp_path, "--overwrite_output_dir"))


# --------------------------------------------------------------------------------------------- inputs


def test_resuming_a_checkpoint_elsewhere_keeps_every_folder_rule(tmp_path: Path) -> None:
    other, out = tmp_path / "other", tmp_path / "out"
    _finished_run(other)
    _finished_run(out)
    checkpoint = other / "checkpoint-2"
    with pytest.raises(UserError, match=f"--output_dir {out} is not empty .resuming from a checkpoint of another"):
        check_output_dir(_config(out, "--resume_from_checkpoint", str(checkpoint)))
    with pytest.raises(UserError, match=f"--output_dir {tmp_path} contains the --resume_from_checkpoint {checkpoint}"):
        check_output_dir(_config(tmp_path, "--resume_from_checkpoint", str(checkpoint), "--overwrite_output_dir"))
    with pytest.raises(UserError, match="--overwrite_output_dir would delete --resume_from_checkpoint"):
        check_output_dir(_config(other, "--resume_from_checkpoint", str(checkpoint), "--overwrite_output_dir"))
    inside = checkpoint / "continued"
    with pytest.raises(UserError, match=f"--output_dir {inside} is inside the --resume_from_checkpoint"):
        check_output_dir(_config(inside, "--resume_from_checkpoint", str(checkpoint)))
    assert check_output_dir(_config(other, "--resume_from_checkpoint", str(checkpoint))) == other  # its own


def test_the_config_file_is_an_input(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("learning_rate: 0.001\n")
    cfg = parse_config(["--config", str(config), "--output_dir", str(tmp_path), "--overwrite_output_dir"], "lora")
    with pytest.raises(UserError, match=f"--output_dir {tmp_path} contains the --config {config}"):
        check_output_dir(cfg)


# --------------------------------------------------------------------------------------------- writer


def test_the_writer_writes_regular_files_only(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "to_null").symlink_to("/dev/null")
    (tmp_path / "to_file").symlink_to(tmp_path / "plain")
    with pytest.raises(UserError, match=f"^{fifo} is a FIFO, not a regular file: only regular files are written"):
        write_text(fifo, "x")
    with pytest.raises(UserError, match=r"to_null is a character device \(a link to /dev/null\), not a regular"):
        write_json(tmp_path / "to_null", {})
    with pytest.raises(UserError, match="is a folder, not a regular file"):
        write_text(tmp_path, "x")
    write_text(tmp_path / "to_file", "replaced")  # a link to a regular file (or nothing) is replaced
    assert (tmp_path / "to_file").read_text() == "replaced" and not (tmp_path / "to_file").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to_file", "to_null"]  # no temporary left


# --------------------------------------------------------------------------------------------- results


def _result_folder(folder: Path, weights: bytes, record_from: bytes | None) -> None:
    """A training run's result folder: weights, and results stamped with the fingerprint of ``record_from``."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(record_from if record_from is not None else weights)
    record = weights_record(folder, 5)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    rows = [{"id": "a", "dialogue": "d", "references": ["a cat"], "prediction": "a cat"}]
    (folder / "predictions.jsonl").write_text(json.dumps(stamp_predictions(rows, record)[0]) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"rouge1": 1.0, "weights": record}))


def test_results_must_belong_to_the_weights_beside_them(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.safetensors").write_bytes(bytes(3 * 2**20))
    first = weights_fingerprint(big)
    (big / "model.safetensors").write_bytes(bytes([1]) * 3 * 2**20)  # same size, other values (trained further)
    assert weights_fingerprint(big) != first and len(first or "") == 16
    assert weights_fingerprint(tmp_path / "nothing") is None

    _result_folder(tmp_path / "current", b"new weights", None)
    _result_folder(tmp_path / "stale", b"new weights", b"old weights")
    check_results_belong(tmp_path / "current", *_results(tmp_path / "current"))
    with pytest.raises(UserError, match="metrics.json belongs to step 5, weights [0-9a-f]{16}, not to the weights now"):
        check_results_belong(tmp_path / "stale", *_results(tmp_path / "stale"))
    metrics, rows = _results(tmp_path / "current")
    rows[0]["weights"] = "0123456789abcdef"  # predictions of other weights beside current metrics
    with pytest.raises(UserError, match="predictions.jsonl line 1 was generated by weights 0123456789abcdef"):
        check_results_belong(tmp_path / "current", metrics, rows)
    metrics.pop("weights")
    with pytest.raises(UserError, match="does not say which weights it belongs to"):
        check_results_belong(tmp_path / "current", metrics, rows)


def _results(folder: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return json.loads((folder / "metrics.json").read_text()), rows


def test_compare_refuses_stale_results_with_one_line(tmp_path: Path) -> None:
    _result_folder(tmp_path / "base", b"base", None)
    _result_folder(tmp_path / "stale", b"new weights", b"old weights")
    with pytest.raises(UserError, match=f"^{tmp_path / 'stale'}: metrics.json belongs to step 5"):
        compare_runs([f"base={tmp_path / 'base'}", f"stale={tmp_path / 'stale'}"], tmp_path / "out", 0, 0, 10)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), "--run", f"b={tmp_path / 'base'}"]
        + ["--run", f"s={tmp_path / 'stale'}", "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "its results are stale" in errors[0], proc.stderr


# --------------------------------------------------------------------------------------------- real runs


def _lists(out: Path, name: str) -> bool:
    try:
        return name in (read_manifest(out) or set())
    except UserError:
        return False


def test_two_runs_into_one_folder_a_resume_during_checkpoints_and_a_killed_runs_lock(
    tmp_path: Path, quickstart_assets: tuple[Path, Path]
) -> None:
    """A training run writes checkpoints; a second run (a resume of it) into the same folder is refused naming
    it; once it is killed, its lock is taken over and ``latest`` continues from its last checkpoint."""
    from dialogsum.steps import check_run

    model_dir, data_dir = quickstart_assets
    out = tmp_path / "run"
    flags = [
        *("--model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none"),
        *("--train_file", str(data_dir / "train.jsonl"), "--test_file", str(data_dir / "test.jsonl")),
        *("--max_train_samples", "16", "--per_device_train_batch_size", "4", "--max_source_length", "64"),
        *("--max_target_length", "24", "--max_train_steps", "100000", "--checkpointing_steps", "1"),
    ]
    first = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train_lora.py"), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(OMP_NUM_THREADS="1"),
    )
    try:
        deadline = time.monotonic() + 240
        while not _lists(out, "checkpoint-2") and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the manifest lists each checkpoint as soon as it is saved, long before the run ends
        assert _lists(out, "checkpoint-2"), first.stderr.read() if first.poll() is not None else "no checkpoint"
        with pytest.raises(UserError, match=f"--output_dir {out} is in use by another run: pid {first.pid} on host"):
            check_run(parse_config([*flags, "--resume_from_checkpoint", "latest"], "lora"))
        with pytest.raises(UserError, match=f"in use by another run: pid {first.pid} on host .* since .*train_lora"):
            check_output_dir(_config(out, "--overwrite_output_dir"))  # nor overwritten while it runs
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    run = check_run(parse_config([*flags, "--resume_from_checkpoint", "latest"], "lora"))
    assert run.resume is not None and run.resume.parent == out  # the killed run's lock taken over, its latest
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert take_output_dir(out) is not None


def test_the_tree_snapshot_sees_files_links_and_special_files_but_not_what_a_run_may_write(tmp_path: Path) -> None:
    from helpers import snapshot_tree, tree_changes

    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "data.jsonl")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "out").mkdir()
    before = snapshot_tree([tmp_path], may_write=[tmp_path / "out", tmp_path / "summary.jsonl"])
    assert before[str(tmp_path / "pipe")] == "fifo" and before[str(tmp_path / "link")].startswith("link -> ")
    (tmp_path / "out" / "metrics.json").write_text("{}")  # what the run may write
    (tmp_path / ".summary.jsonl.x.tmp").write_text("")  # a writer's temporary file beside its output
    (tmp_path / "data.jsonl").write_text("{}\n{}\n")
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to("/dev/null")
    (tmp_path / "pipe").unlink()
    (tmp_path / "pipe").write_text("")
    after = snapshot_tree([tmp_path], may_write=[tmp_path / "out", tmp_path / "summary.jsonl"])
    assert tree_changes(before, after) == [f"changed {tmp_path / name}" for name in ("data.jsonl", "link", "pipe")]


def test_discard_moves_aside_then_deletes(tmp_path: Path) -> None:
    """The one way the project deletes what a run wrote: renamed into a trash folder first, then removed."""
    from dialogsum.files import discard

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "keep.md").write_text("mine")
    discard([tmp_path / "checkpoint-2", tmp_path / "metrics.json"], tmp_path / ".trash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.md"]
    with pytest.raises(FileNotFoundError):  # a rename that fails deletes nothing
        discard([tmp_path / "missing", tmp_path / "keep.md"], tmp_path / ".trash2")
    assert (tmp_path / "keep.md").read_text() == "mine"
