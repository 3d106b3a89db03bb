"""The adversarial pass of issue 15, kept: hostile inputs through the real scripts, each a real process.

Every refused case must give exit code != 0, exactly one ``error:`` line on stderr, no traceback, and leave the
files it must not touch byte for byte as they were (sha256 before and after). Around every case the whole tree
it can reach (the cases' folder, the tiny model and data, the finished run) is snapshotted by the file-system
invariant harness (``helpers.snapshot_tree``: files by sha256, links by target, FIFOs and devices by kind) and
must be unchanged afterwards outside what a run may write (the output folders and files its flags name; for a
refused case only those that did not exist before it). Three cases are not errors and must
train: a YAML value parsed as the command line would, ``latest`` over the leftovers of this same run, and
``--overwrite_output_dir`` (which must clear the previous run, so that the new run's ``latest`` works).

The cases run two at a time (2 cores) in one module fixture; cases that need a finished run use copies of one
tiny LoRA run trained once (``finished_run``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import HANG_TIMEOUT_S, REPO, snapshot_tree, subprocess_env, tree_changes
from test_bad_input import Case

from dialogsum.run_folder import LOCK_FILE, MANIFEST_FILE

#: Flags of every training run here: the quick-start tiny T5 and data, a few steps, no tracker.
TRAIN_FLAGS = (
    "--max_train_samples",
    "16",
    "--max_test_samples",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--max_source_length",
    "64",
    "--max_target_length",
    "24",
    "--max_new_tokens",
    "8",
    "--report_to",
    "none",
)


def _sha256_tree(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under the given files/folders (missing ones recorded as such)."""
    found: dict[str, str] = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        if not root.exists():
            found[str(root)] = "missing"
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _run(script: str, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=HANG_TIMEOUT_S,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        cwd=str(REPO),
    )


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cut(path: Path) -> None:
    """Cut a file to half its size, as an interrupted copy would."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def _run_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", str(model_dir), "--output_dir", str(out)),
        *("--train_file", str(data_dir / "train.jsonl"), "--test_file", str(data_dir / "test.jsonl")),
        *TRAIN_FLAGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> Path:
    """One finished tiny LoRA run: checkpoint-1 and checkpoint-2, adapter, metrics, report (shared, read-only)."""
    model_dir, data_dir = quickstart_assets
    out = tmp_path_factory.mktemp("hostile_run") / "run"
    proc = _run(
        "train_lora.py", _run_args(model_dir, data_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and (out / "metrics.json").is_file()
    return out


def _build_cases(root: Path, model_dir: Path, data_dir: Path, run: Path) -> dict[str, Case]:  # noqa: PLR0915
    """Write the hostile files and folders under ``root`` and describe every case."""
    rows = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()[:8]]
    test_rows = [json.loads(x) for x in (data_dir / "test.jsonl").read_text().splitlines()[:6]]
    good = {s: str(data_dir / f"{s}.jsonl") for s in ("train", "validation", "test")}
    files = root / "files"
    files.mkdir()
    counter = iter(range(1000))

    def fresh(name: str = "out") -> Path:
        return root / f"{name}{next(counter)}"

    def train(*override: str, script_model: Path = model_dir) -> list[str]:
        return [
            *("--model_name_or_path", str(script_model), "--output_dir", str(fresh())),
            *("--train_file", good["train"], "--test_file", good["test"]),
            *TRAIN_FLAGS,
            *("--max_train_steps", "1"),
            *override,
        ]

    def evaluate(*override: str) -> list[str]:
        return [
            *("--model_name_or_path", str(model_dir), "--test_file", good["test"]),
            *("--output_dir", str(fresh("eval")), "--max_new_tokens", "8"),
            *override,
        ]

    def summarize(*extra: str, model: Path = model_dir, source: Path | None = None) -> list[str]:
        return ["--model_name_or_path", str(model), "--input_file", str(source or dialogues), *extra]

    def copy_of_run(name: str) -> Path:
        return Path(shutil.copytree(run, root / name))

    # 1. summarize.py writing onto its input, through a link, or over an existing file
    dialogues = _jsonl(files / "dialogues.jsonl", test_rows)
    (files / "link.jsonl").symlink_to(dialogues)
    earlier = files / "earlier_summaries.jsonl"
    earlier.write_text('{"id": "x", "summary": "kept"}\n')

    # 2. a finished run without checkpoints, then --resume_from_checkpoint latest with other settings
    finished = copy_of_run("finished_no_checkpoint")
    for checkpoint in finished.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    leftovers = root / "killed_before_first_checkpoint"
    leftovers.mkdir()
    (leftovers / MANIFEST_FILE).write_text('{"format": 1, "entries": []}')  # written when the run took the folder
    shutil.copy(run / "config.yaml", leftovers / "config.yaml")
    (leftovers / "checkpoint-1.tmp").mkdir()  # a save the kill interrupted
    other_leftovers = root / "other_runs_leftovers"
    shutil.copytree(leftovers, other_leftovers)

    # 3. the model's own folder as output
    model_copy = Path(shutil.copytree(model_dir, root / "model_copy"))

    continued = copy_of_run("continued_without_eval")  # trained further with --do_eval false

    # 4. --overwrite_output_dir over a finished LoRA run with checkpoints (and a user's own file)
    overwritten = copy_of_run("overwritten")
    (overwritten / "notes.txt").write_text("mine")

    # 5. YAML values parsed as on the command line
    def yaml_file(name: str, text: str) -> str:
        path = files / f"{name}.yaml"
        path.write_text(text)
        return str(path)

    # 6. a ';'-separated CSV read as ','
    semicolon = files / "semicolon.csv"
    semicolon.write_text(
        "fname;dialogue;summary\n"
        + "".join(f"{r['fname']};{r['dialogue'].splitlines()[0]}, yes;ok, fine\n" for r in rows)
    )

    # 7. damaged checkpoints and weights
    cut_weights = copy_of_run("cut_checkpoint_weights")
    _cut(cut_weights / "checkpoint-2" / "model.safetensors")
    cut_rng = copy_of_run("cut_checkpoint_rng")
    _cut(cut_rng / "checkpoint-2" / "rng_state_0.pkl")
    for folder in (cut_weights, cut_rng):
        (folder / "metrics.json").unlink()  # a run killed after checkpoint-2, before finishing
    cut_adapter = Path(shutil.copytree(run, root / "cut_adapter", ignore=shutil.ignore_patterns("checkpoint-*")))
    _cut(cut_adapter / "adapter_model.safetensors")
    cut_model = Path(shutil.copytree(model_dir, root / "cut_model"))
    _cut(cut_model / "model.safetensors")

    # 9. places that cannot be written
    a_file = files / "plain.txt"
    a_file.write_text("x")

    # 10. cells that are not text, keys missing from some rows, a folder as a data file, shared ids
    _jsonl(files / "number.jsonl", [*rows[:2], {**rows[2], "dialogue": 42}, *rows[3:]])
    _jsonl(files / "boolean.jsonl", [*rows[:4], {**rows[4], "summary": True}, *rows[5:]])
    _jsonl(files / "object.jsonl", [{**rows[0], "dialogue": {"text": "hi"}}, *rows[1:]])
    missing = {k: v for k, v in rows[2].items() if k != "dialogue"}
    _jsonl(files / "missing_key.jsonl", [*rows[:2], missing, *rows[3:]])
    _jsonl(files / "missing_first.jsonl", [missing, *rows[3:]])
    (files / "a_folder.jsonl").mkdir()
    _jsonl(files / "shared_ids.jsonl", [*test_rows[:3], {**test_rows[3], "fname": test_rows[1]["fname"]}])
    _jsonl(files / "late_bad_row.jsonl", [*test_rows[:5], {**test_rows[5], "dialogue": 7}])
    used = root / "used_eval_dir"
    used.mkdir()
    (used / "metrics.json").write_text("{}")
    (used / MANIFEST_FILE).write_text('{"format": 1, "entries": ["metrics.json"]}')
    persons = root / "a_persons_folder"  # what a person keeps in a folder: not a run's
    (persons / "plots").mkdir(parents=True)
    (persons / "wandb").mkdir()
    (persons / "README.md").write_text("my notes")
    (persons / "config.json").write_text("{}")
    (persons / "plots" / "mine.png").write_bytes(b"png")
    fifo = files / "fifo.jsonl"
    os.mkfifo(fifo)
    (files / "null_link.jsonl").symlink_to("/dev/null")
    config_inside = root / "config_inside"
    config_inside.mkdir()
    config_in_out = config_inside / "settings.yaml"
    config_in_out.write_text("learning_rate: 0.001\n")

    def trained_lora_afresh(proc: subprocess.CompletedProcess) -> None:
        assert "starting afresh" in proc.stderr
        metrics = json.loads((leftovers / "metrics.json").read_text())
        assert metrics["method"] == "lora" and metrics["train_steps"] == 2

    def overwrote_cleanly(proc: subprocess.CompletedProcess) -> None:
        names = sorted(p.name for p in overwritten.iterdir())
        assert "notes.txt" in names  # not a run's file: left alone
        assert not any(n.startswith(("adapter_", ".overwritten")) for n in names), names  # the LoRA run's files went
        assert sorted(p.name for p in overwritten.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        assert f"resumed from {overwritten / 'checkpoint-1'} at step 1" in proc.stderr
        assert json.loads((overwritten / "metrics.json").read_text())["method"] == "full"

    def results_of_the_final_weights(proc: subprocess.CompletedProcess) -> None:
        from dialogsum.results import check_results_belong, weights_fingerprint

        metrics = json.loads((continued / "metrics.json").read_text())
        assert metrics["weights"]["step"] == 3 and metrics["weights"]["fingerprint"] == weights_fingerprint(continued)
        assert not (continued / "predictions.jsonl").exists()  # the stale predictions of step 2 went
        assert "weights at step 3" in (continued / "report.md").read_text()
        check_results_belong(continued, metrics, [])

    def summaries_on_stdout(proc: subprocess.CompletedProcess) -> None:
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [row["id"] for row in rows] == [row["fname"] for row in test_rows], proc.stdout

    def yaml_list_kept_whole(proc: subprocess.CompletedProcess) -> None:
        assert "'w'" not in proc.stderr and "--lora_target_modules wo2 matches" in proc.stderr

    return {
        # ---- 1: summarize.py output safety
        "summarize: output is the input": Case(
            "summarize.py",
            summarize("--output_file", str(dialogues)),
            [f"--output_file {dialogues} is the --input_file", "never writes where its inputs are"],
            unchanged=[dialogues],
        ),
        "summarize: output is a link to the input": Case(
            "summarize.py",
            summarize("--output_file", str(files / "link.jsonl"), "--overwrite_output_file"),
            [f"--output_file {files / 'link.jsonl'} is the --input_file {dialogues}"],
            unchanged=[dialogues],
        ),
        "summarize: output exists": Case(
            "summarize.py",
            summarize("--output_file", str(earlier)),
            [f"--output_file {earlier} exists; pass --overwrite_output_file to replace it"],
            unchanged=[earlier, dialogues],
        ),
        "summarize: output inside the model folder": Case(
            "summarize.py",
            summarize("--output_file", str(model_copy / "config.json"), "--overwrite_output_file", model=model_copy),
            ["is inside the --model_name_or_path"],
            unchanged=[model_copy],
        ),
        # ---- 2: latest into another run's folder
        "latest into a finished run without checkpoints": Case(
            "train_full.py",
            _run_args(model_dir, data_dir, finished, "--max_train_steps", "1", "--resume_from_checkpoint", "latest"),
            [f"--output_dir {finished} holds a finished run (metrics.json) and no checkpoint to continue from"],
            unchanged=[finished],
        ),
        "latest over another run's leftovers": Case(
            "train_lora.py",
            _run_args(
                model_dir,
                data_dir,
                other_leftovers,
                "--max_train_steps",
                "2",
                "--resume_from_checkpoint",
                "latest",
                "--lora_r",
                "8",
            ),
            ["holds another run's files and no checkpoint", "lora_r: that run 32 vs now 8"],
            unchanged=[other_leftovers],
        ),
        "latest over this same run's leftovers (trains)": Case(
            "train_lora.py",
            _run_args(
                model_dir,
                data_dir,
                leftovers,
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--resume_from_checkpoint",
                "latest",
            ),
            [],
            exit_code=0,
            check=trained_lora_afresh,
        ),
        # ---- 3: output folder = an input
        "output_dir is the model folder (with overwrite)": Case(
            "train_full.py",
            [*train(script_model=model_copy), "--output_dir", str(model_copy), "--overwrite_output_dir"],
            [f"--output_dir {model_copy} is the --model_name_or_path {model_copy}"],
            unchanged=[model_copy],
        ),
        "output_dir contains the data": Case(
            "train_full.py",
            [*train(), "--output_dir", str(data_dir), "--overwrite_output_dir"],
            [f"--output_dir {data_dir} contains the --train_file"],
            unchanged=[data_dir],
        ),
        "evaluate output_dir inside the adapter": Case(
            "evaluate.py",
            [*evaluate("--adapter_path", str(run)), "--output_dir", str(run / "eval")],
            [f"--output_dir {run / 'eval'} is inside the --adapter_path {run}"],
            absent=[run / "eval"],
        ),
        # ---- 4: overwrite clears the old run; the new run's latest resumes from its own checkpoint
        "overwrite clears the previous run (trains, then resumes)": Case(
            "train_full.py",
            _run_args(model_dir, data_dir, overwritten, "--max_train_steps", "1", "--checkpointing_steps", "1")
            + ["--overwrite_output_dir"],
            [],
            exit_code=0,
            then=_run_args(model_dir, data_dir, overwritten, "--max_train_steps", "2", "--checkpointing_steps", "1")
            + ["--resume_from_checkpoint", "latest"],
            check=overwrote_cleanly,
        ),
        # ---- 5: YAML values go through the flags' own parsing
        "yaml: a string for a list flag is one name": Case(
            "train_lora.py",
            [*train(), "--config", yaml_file("list", "lora_target_modules: wo2\n")],
            ["--lora_target_modules wo2 matches no linear layer"],
            check=yaml_list_kept_whole,
        ),
        "yaml: a quoted number is a number": Case(
            "train_full.py",
            [*train(), "--config", yaml_file("quoted", 'learning_rate: "5"\n')],
            ["--learning_rate must be in (0, 1), got 5.0"],
            exit_code=2,
        ),
        "yaml: 2.7 for an integer": Case(
            "train_full.py",
            [*train()[:-2], "--config", yaml_file("float_steps", "max_train_steps: 2.7\n")],
            ["float_steps.yaml: max_train_steps: invalid int value: '2.7'"],
            exit_code=2,
        ),
        "yaml: true for an integer": Case(
            "train_full.py",
            [*train()[:-2], "--config", yaml_file("bool_steps", "max_train_steps: true\n")],
            ["max_train_steps expects an integer, got true"],
            exit_code=2,
        ),
        'yaml: do_train "no" is false': Case(
            "train_full.py",
            [*train(), "--config", yaml_file("no", 'do_train: "no"\ndo_eval: false\n')],
            ["nothing to do: both --do_train and --do_eval are false"],
        ),
        # ---- 6: a CSV row with more fields than its header, in all three scripts
        "csv: ';' read as ',' (train)": Case(
            "train_full.py",
            train("--train_file", str(semicolon)),
            [f"{semicolon}: line 2 has ", "field(s) but the header has 1", "separated by something other than commas"],
        ),
        "csv: ';' read as ',' (evaluate)": Case(
            "evaluate.py", evaluate("--test_file", str(semicolon)), ["line 2 has ", "field(s) but the header has 1"]
        ),
        "csv: ';' read as ',' (summarize)": Case(
            "summarize.py",
            summarize(source=semicolon),
            ["line 2 has ", "field(s) but the header has 1"],
        ),
        # ---- 7: damaged checkpoints and weights
        "checkpoint weights cut short": Case(
            "train_lora.py",
            _run_args(model_dir, data_dir, cut_weights, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"),
            [
                f"checkpoint {cut_weights / 'checkpoint-2'} is damaged: model.safetensors is cut short or corrupt",
                f"the previous complete checkpoint is {cut_weights / 'checkpoint-1'}",
            ],
            unchanged=[cut_weights],
        ),
        "checkpoint rng state cut short": Case(
            "train_lora.py",
            _run_args(
                model_dir,
                data_dir,
                cut_rng,
                "--max_train_steps",
                "3",
                "--resume_from_checkpoint",
                str(cut_rng / "checkpoint-2"),
            ),
            [
                "is damaged: rng_state_0.pkl is cut short or corrupt",
                f"--resume_from_checkpoint {cut_rng / 'checkpoint-1'}",
            ],
            unchanged=[cut_rng],
        ),
        "adapter weights cut short": Case(
            "evaluate.py",
            evaluate("--adapter_path", str(cut_adapter)),
            [f"{cut_adapter / 'adapter_model.safetensors'} is cut short or corrupt"],
        ),
        "model weights cut short": Case(
            "summarize.py",
            summarize(model=cut_model),
            [f"{cut_model / 'model.safetensors'} is cut short or corrupt"],
        ),
        # ---- 8: seeds numpy cannot take
        "seed -1": Case("train_full.py", train("--seed", "-1"), ["--seed must be in [0, 4294967295], got -1"], 2),
        "seed 2**32": Case(
            "train_lora.py", train("--seed", "4294967296"), ["--seed must be in [0, 4294967295], got 4294967296"], 2
        ),
        # ---- 9: outputs that cannot be written, found before the model loads
        "output_dir under a file": Case(
            "train_full.py",
            [*train(), "--output_dir", str(a_file / "out")],
            [f"--output_dir {a_file / 'out'} cannot be created: {a_file} is a file"],
        ),
        "output_dir in /proc": Case(
            "train_lora.py",
            [*train(), "--output_dir", "/proc/dialogsum-x"],
            ["--output_dir /proc/dialogsum-x cannot be created"],
        ),
        "summarize output_file under a file": Case(
            "summarize.py",
            summarize("--output_file", str(a_file / "s.jsonl")),
            [f"--output_file {a_file / 's.jsonl'} cannot be created: {a_file} is a file, not a folder"],
        ),
        "summarize output_file in /proc": Case(
            "summarize.py",
            summarize("--output_file", "/proc/s.jsonl"),
            ["--output_file /proc/s.jsonl cannot be created"],
        ),
        # ---- 10: messages that say what is wrong
        "a number as the dialogue": Case(
            "train_full.py",
            train("--train_file", str(files / "number.jsonl")),
            ["row 3 has a number (42) in 'dialogue', expected text"],
        ),
        "a boolean as the summary": Case(
            "train_lora.py",
            train("--train_file", str(files / "boolean.jsonl")),
            ["row 5 has a boolean (true) in 'summary', expected text"],
        ),
        "an object as the dialogue": Case(
            "summarize.py",
            summarize(source=files / "object.jsonl"),
            ["row 1 has an object in 'dialogue', expected text"],
        ),
        "a folder as a data file": Case(
            "train_full.py",
            train("--train_file", str(files / "a_folder.jsonl")),
            ["data file is a directory, expected a file"],
        ),
        "a key missing from one row": Case(
            "train_full.py",
            train("--train_file", str(files / "missing_key.jsonl")),
            ["row 3 has no 'dialogue' key (other rows have it)"],
        ),
        "a key missing from the first row": Case(
            "train_full.py",
            train("--train_file", str(files / "missing_first.jsonl")),
            ["row 1 has no 'dialogue' key (other rows have it)"],
        ),
        "evaluate into a used folder": Case(
            "evaluate.py",
            [*evaluate(), "--output_dir", str(used)],
            [f"--output_dir {used} is not empty; pass --overwrite_output_dir to replace the run in it"],
            unchanged=[used],
            check=lambda proc: None if "--resume_from_checkpoint" not in proc.stderr else pytest.fail(proc.stderr),
        ),
        "evaluate checks rows before the model": Case(
            "evaluate.py",
            evaluate("--test_file", str(files / "late_bad_row.jsonl")),
            ["row 6 has a number (7) in 'dialogue', expected text"],
        ),
        "evaluate: different dialogues share an id": Case(
            "evaluate.py",
            evaluate("--test_file", str(files / "shared_ids.jsonl")),
            [f"dialogues 2 and 4 are different but share the id {test_rows[1]['fname']!r} (column 'fname')"],
        ),
        # ---- 11: values that make no sense
        "length_penalty nan (evaluate)": Case(
            "evaluate.py", evaluate("--length_penalty", "nan"), ["--length_penalty must be a finite number, got nan"], 2
        ),
        "length_penalty nan (train)": Case(
            "train_full.py", train("--length_penalty", "nan"), ["--length_penalty must be a finite number, got nan"], 2
        ),
        "max_source_length below the template": Case(
            "train_full.py",
            [*train(), "--max_source_length", "8"],
            ["--max_source_length 8 leaves no room for the dialogue: the prompt template alone takes"],
        ),
        "max_source_length below the template (summarize)": Case(
            "summarize.py",
            summarize("--max_source_length", "5"),
            ["--max_source_length 5 leaves no room for the dialogue"],
        ),
        # ---- issue 19: a run owns its output folder, and only what it wrote there
        "evaluate overwrite over a person's folder": Case(
            "evaluate.py",
            [*evaluate(), "--output_dir", str(persons), "--overwrite_output_dir"],
            [
                f"--output_dir {persons} is not empty and is not a run folder",
                "it holds README.md, config.json, plots, wandb; choose another --output_dir",
            ],
            unchanged=[persons],
            absent=[persons / MANIFEST_FILE, persons / LOCK_FILE],
        ),
        "resume a checkpoint elsewhere into a used run folder": Case(
            "train_lora.py",
            [*train(), "--output_dir", str(used), "--resume_from_checkpoint", str(run / "checkpoint-1")],
            [f"--output_dir {used} is not empty (resuming from a checkpoint of another folder starts a new run"],
            unchanged=[used, run],
        ),
        "output_dir is inside the checkpoint being resumed": Case(
            "train_lora.py",
            [
                *train(),
                "--output_dir",
                str(run / "checkpoint-1" / "out"),
                "--resume_from_checkpoint",
                str(run / "checkpoint-1"),
            ],
            [f"is inside the --resume_from_checkpoint {run / 'checkpoint-1'}"],
            absent=[run / "checkpoint-1" / "out"],
        ),
        "output_dir contains the --config file": Case(
            "train_full.py",
            [*train(), "--output_dir", str(config_inside), "--config", str(config_in_out), "--overwrite_output_dir"],
            [f"--output_dir {config_inside} contains the --config {config_in_out}"],
            unchanged=[config_inside],
        ),
        "continuing a finished run with --do_eval false (trains)": Case(
            "train_lora.py",
            _run_args(model_dir, data_dir, continued, "--max_train_steps", "3", "--checkpointing_steps", "1")
            + ["--resume_from_checkpoint", "latest", "--do_eval", "false"],
            [],
            exit_code=0,
            check=results_of_the_final_weights,
        ),
        "summarize output_file is a FIFO": Case(
            "summarize.py",
            summarize("--output_file", str(fifo), "--overwrite_output_file"),
            [f"--output_file {fifo} is a FIFO, not a regular file"],
        ),
        "summarize output_file links to a character device": Case(
            "summarize.py",
            summarize("--output_file", str(files / "null_link.jsonl"), "--overwrite_output_file"),
            ["null_link.jsonl is a character device (a link to /dev/null), not a regular file"],
        ),
        "summarize output_file - is standard output": Case(
            "summarize.py",
            summarize("--output_file", "-", "--max_new_tokens", "4"),
            [],
            exit_code=0,
            check=summaries_on_stdout,
            absent=[REPO / "-"],
        ),
        "LoRA rank above the layer size": Case(
            "train_lora.py",
            train("--lora_r", "65"),
            ["--lora_r 65 is larger than the adapted layers allow", "use --lora_r 64 or less"],
        ),
    }


@dataclass
class Outcome:
    """What came back: the process (and the second one of a two-step case), the files' digests before/after, and
    the changes of the whole tree outside what the runs may write."""

    proc: subprocess.CompletedProcess
    second: subprocess.CompletedProcess | None
    before: dict[str, str]
    after: dict[str, str]
    changes: list[str]


#: The flags that name what a run writes.
OUTPUT_FLAGS = ("--output_dir", "--output_file", "--checkpoint_dir")


def may_write(case: Case) -> list[Path]:
    """What ``case`` may write: the outputs its flags name (the last of a repeated flag wins), for a refused case
    only those that do not exist yet (a refused run writes nothing that was there)."""
    paths = []
    for args in (case.args, case.then or []):
        named = {flag: value for flag, value in zip(args, args[1:]) if flag in OUTPUT_FLAGS and value != "-"}
        paths += [Path(value) for value in named.values()]
    if case.exit_code != 0:
        paths = [p for p in paths if not p.exists() and not p.is_symlink()]
    return paths


def _run_case(case: Case, roots: list[Path], writable: list[Path]) -> Outcome:
    before, tree = _sha256_tree(case.unchanged), snapshot_tree(roots, writable)
    proc = _run(case.script, case.args)
    second = _run(case.script, case.then) if case.then is not None and proc.returncode == 0 else None
    changes = tree_changes(tree, snapshot_tree(roots, writable))
    return Outcome(proc, second, before, _sha256_tree(case.unchanged), changes)


@pytest.fixture(scope="module")
def roots(
    tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path], finished_run: Path
) -> list[Path]:
    """The trees the cases can reach: their own folder, the tiny model and data, the finished run."""
    return [tmp_path_factory.mktemp("hostile"), quickstart_assets[0].parent, finished_run.parent]


@pytest.fixture(scope="module")
def cases(roots: list[Path], quickstart_assets: tuple[Path, Path], finished_run: Path) -> dict[str, Case]:
    """Every case, with its files written."""
    model_dir, data_dir = quickstart_assets
    return _build_cases(roots[0], model_dir, data_dir, finished_run)


@pytest.fixture(scope="module")
def outcomes(cases: dict[str, Case], roots: list[Path]) -> dict[str, Outcome]:
    """Run every case, two processes at a time (2 cores). Each case's tree snapshot leaves out what any case may
    write (two run at once)."""
    writable = [path for case in cases.values() for path in may_write(case)]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run_case, case, roots, writable) for name, case in cases.items()}
        return {name: future.result() for name, future in futures.items()}


CASE_NAMES = [
    "summarize: output is the input",
    "summarize: output is a link to the input",
    "summarize: output exists",
    "summarize: output inside the model folder",
    "latest into a finished run without checkpoints",
    "latest over another run's leftovers",
    "latest over this same run's leftovers (trains)",
    "output_dir is the model folder (with overwrite)",
    "output_dir contains the data",
    "evaluate output_dir inside the adapter",
    "overwrite clears the previous run (trains, then resumes)",
    "yaml: a string for a list flag is one name",
    "yaml: a quoted number is a number",
    "yaml: 2.7 for an integer",
    "yaml: true for an integer",
    'yaml: do_train "no" is false',
    "csv: ';' read as ',' (train)",
    "csv: ';' read as ',' (evaluate)",
    "csv: ';' read as ',' (summarize)",
    "checkpoint weights cut short",
    "checkpoint rng state cut short",
    "adapter weights cut short",
    "model weights cut short",
    "seed -1",
    "seed 2**32",
    "output_dir under a file",
    "output_dir in /proc",
    "summarize output_file under a file",
    "summarize output_file in /proc",
    "a number as the dialogue",
    "a boolean as the summary",
    "an object as the dialogue",
    "a folder as a data file",
    "a key missing from one row",
    "a key missing from the first row",
    "evaluate into a used folder",
    "evaluate checks rows before the model",
    "evaluate: different dialogues share an id",
    "length_penalty nan (evaluate)",
    "length_penalty nan (train)",
    "max_source_length below the template",
    "max_source_length below the template (summarize)",
    "evaluate overwrite over a person's folder",
    "resume a checkpoint elsewhere into a used run folder",
    "output_dir is inside the checkpoint being resumed",
    "output_dir contains the --config file",
    "continuing a finished run with --do_eval false (trains)",
    "summarize output_file is a FIFO",
    "summarize output_file links to a character device",
    "summarize output_file - is standard output",
    "LoRA rank above the layer size",
]


def test_every_case_is_listed(cases: dict[str, Case]) -> None:
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_input(name: str, cases: dict[str, Case], outcomes: dict[str, Outcome]) -> None:
    case, outcome = cases[name], outcomes[name]
    if "/proc" in name and not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    for proc in (outcome.proc, outcome.second):
        if proc is None:
            continue
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    proc = outcome.second or outcome.proc
    assert outcome.proc.returncode == case.exit_code, outcome.proc.stderr[-3000:]
    if case.then is not None:
        assert outcome.second is not None and outcome.second.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if case.exit_code == 0:
        assert not errors, proc.stderr[-3000:]
    else:
        assert len(errors) == 1, proc.stderr[-3000:]
        for text in case.expect:
            assert text in errors[0], errors[0]
        assert "trainable model parameters" not in proc.stderr, "refused only after the model was loaded"
    assert outcome.after == outcome.before, f"{name}: files changed that must not"
    assert not outcome.changes, f"{name}: the tree changed outside what the run may write: {outcome.changes[:5]}"
    for path in case.absent:
        assert not path.exists(), path
    if case.check is not None:
        case.check(proc)
