"""The whole lab in one command: zero-shot evaluation -> full fine-tuning -> LoRA -> comparison, in one folder.

    python scripts/lab.py --quickstart --output_dir runs/lab          # offline, tiny model, ~1 minute on 2 cores
    python scripts/lab.py --output_dir runs/lab --num_train_epochs 1  # google/flan-t5-base on DialogSum (GPU)
    python scripts/lab.py --quickstart --output_dir runs/lab --methods full,lora,ia3   # (IA)^3 as well

Writes <output_dir>/original (zero-shot baseline of the starting model, scripts/evaluate.py), one folder per
method of --methods (full: scripts/train_full.py, lora: scripts/train_lora.py, ia3: scripts/train_ia3.py) and
comparison (scripts/compare.py), and prints the comparison table (ROUGE and each method's resources). Each stage
is a real `accelerate launch` of the script, printed before it runs so that it can be rerun alone. Every other
flag goes to the stages that take it (evaluate.py takes the model, data, evaluation and generation flags; the
training scripts take all); --full_args / --lora_args / --ia3_args add flags for one stage only.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dialogsum.cli import FlagParser, run_cli
from dialogsum.config import METHODS, QUICKSTART_DEFAULTS, build_parser, parse_config
from dialogsum.errors import ConfigError, UserError
from dialogsum.inference import EVALUATE_FLAGS
from dialogsum.run_folder import (
    check_folder_contents,
    read_manifest,
    record_outputs,
    release_output_dirs,
    take_output_dir,
)

REPO = Path(__file__).resolve().parents[1]
STAGES = ("original", *METHODS, "comparison")
DEFAULT_METHODS = "full,lora"
#: Flags the lab itself sets for every stage (given to the lab, they are refused: they would clash).
OWN_FLAGS = ("output_dir", "overwrite_output_dir", "quickstart", "config")


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument(
        "--output_dir", required=True, help="The lab folder: original/, one folder per method, comparison/."
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"Comma-separated methods to train after the zero-shot baseline, in order: any of {', '.join(METHODS)}.",
    )
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace the stages' previous results.")
    parser.add_argument(
        "--quickstart",
        action="store_true",
        help="Offline: the quick start's tiny T5 and synthetic dialogues (built under <output_dir>/quickstart_assets).",
    )
    parser.add_argument(
        "--accelerate_config",
        default=None,
        help="accelerate config for every stage (default: accelerate_configs/single_gpu.yaml on a GPU machine, "
        "else accelerate_configs/cpu.yaml).",
    )
    parser.add_argument("--full_args", default="", help="Extra flags for train_full.py only (one quoted string).")
    parser.add_argument("--lora_args", default="", help="Extra flags for train_lora.py only (one quoted string).")
    parser.add_argument("--ia3_args", default="", help="Extra flags for train_ia3.py only (one quoted string).")
    parser.add_argument("--num_samples", type=int, default=3, help="Sample dialogues shown side by side.")
    return parser.parse_known_args(argv)


def stage_flags(flag: str, text: str) -> list[str]:
    """The flags of one ``--full_args``/``--lora_args``/``--ia3_args`` string, split as a shell would (one error
    line if its quotes do not close)."""
    try:
        return shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ConfigError(f"{flag} {text!r} cannot be split into flags: {str(exc).lower()}") from exc


def flag_groups(args: Sequence[str]) -> list[list[str]]:
    """``["--a", "1", "--b", "x", "y", "--c"]`` -> ``[["--a", "1"], ["--b", "x", "y"], ["--c"]]``."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def _flag_name(arg: str) -> str:
    name = arg[2:].split("=", 1)[0]
    return name[3:] if name.startswith("no_") else name


def evaluate_flag_names() -> set[str]:
    """The flags scripts/evaluate.py takes."""
    return {a.dest for a in build_parser("", EVALUATE_FLAGS, config_file=False)._actions}


def evaluate_flags(groups: list[list[str]]) -> list[str]:
    """The flags of ``groups`` that scripts/evaluate.py takes (the others are training flags)."""
    accepted = evaluate_flag_names()
    return [arg for group in groups if _flag_name(group[0]) in accepted for arg in group]


def quickstart_zero_shot(out: Path, given: set[str]) -> list[str]:
    """evaluate.py flags for the quick start's zero-shot stage: the tiny model and test data that --quickstart
    builds in each training folder (deterministic, so the same), built once under ``out/quickstart_assets``, and
    the quick-start presets evaluate.py takes (source length, generation length, batch) unless ``given``."""
    from dialogsum.quickstart import build_quickstart_assets

    model_dir, data_dir = build_quickstart_assets(out / "quickstart_assets", seed=0)
    accepted = evaluate_flag_names() - {"report_to"}  # the baseline logs to trackers only when asked
    preset = [
        str(x)
        for key, value in QUICKSTART_DEFAULTS["common"].items()
        if key in accepted and key not in given
        for x in (f"--{key}", value)
    ]
    return ["--model_name_or_path", str(model_dir), "--test_file", str(data_dir / "test.jsonl"), *preset]


def _default_config() -> str:
    import torch

    name = "single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml"
    return str(REPO / "accelerate_configs" / name)


def lab_methods(text: str) -> list[str]:
    """``--methods full,lora,ia3`` as a list; unknown or repeated names refused."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"--methods takes a comma-separated list of {', '.join(METHODS)}, got {text!r}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods names a method twice: {text!r}")
    return methods


def _check(args: argparse.Namespace, passed: list[str], extra: dict[str, list[str]]) -> Path:
    """Every stage's flags parse (one error line otherwise) and the lab folder may be written; nothing runs yet."""
    out = Path(args.output_dir)
    for groups in flag_groups(passed):
        if groups[0].startswith("--") and _flag_name(groups[0]) in OWN_FLAGS:
            raise ConfigError(f"{groups[0]} is set by the lab for each stage; leave it out")
        if not groups[0].startswith("--"):
            raise ConfigError(f"unrecognized argument {groups[0]!r} (see --help)")
    quick = ["--quickstart"] if args.quickstart else []
    for method, flags in extra.items():
        parse_config([*passed, *flags, *quick, "--output_dir", str(out / method)], method)
    if out.is_file():
        raise UserError(f"--output_dir {out} is a file")
    take_output_dir(out)  # the lab holds its folder; each stage holds its own sub-folder
    if read_manifest(out) is None:
        check_folder_contents(out, overwrite=False)  # only an empty folder becomes a lab folder
    taken = [name for name in STAGES if (out / name).exists() and any((out / name).iterdir())]
    if taken and not args.overwrite_output_dir:
        raise UserError(
            f"--output_dir {out} already holds {', '.join(taken)}; pass --overwrite_output_dir to run the lab again"
        )
    return out


def _shown(command: list[str]) -> str:
    """A stage's command as the user would type it (``accelerate launch ...``)."""
    if command[1:3] == ["-m", "accelerate.commands.launch"]:
        return shlex.join(["accelerate", "launch", *command[3:]])
    return shlex.join(["python", *command[1:]])


def _run(stage: str, command: list[str]) -> None:
    """Run one stage with its output on this terminal; stop the lab when it fails."""
    shown = _shown(command)
    sys.stderr.write(f"\n==> {stage}: {shown}\n")
    sys.stderr.flush()
    start = time.perf_counter()
    code = subprocess.run(command, check=False).returncode
    record_outputs()  # the lab's manifest lists the stage's folder
    if code != 0:
        raise UserError(f"the {stage} stage failed (exit code {code}, its output is above); rerun it with: {shown}")
    sys.stderr.write(f"==> {stage}: done in {time.perf_counter() - start:.0f} s\n")


def main(argv: Sequence[str] | None = None) -> Path:
    """Check every stage's flags, then run the stages in order (baseline, methods, comparison); returns the
    comparison folder."""
    args, passed = _parse(argv)
    methods = lab_methods(args.methods)
    extra = {method: stage_flags(f"--{method}_args", getattr(args, f"{method}_args")) for method in methods}
    try:
        return _run_lab(args, passed, extra)
    finally:
        release_output_dirs()


def _run_lab(args: argparse.Namespace, passed: list[str], extra: dict[str, list[str]]) -> Path:
    out = _check(args, passed, extra)
    config = args.accelerate_config or _default_config()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    given = {_flag_name(group[0]) for group in flag_groups(passed)}
    if "wandb_group" not in given:
        passed = [*passed, "--wandb_group", f"lab-{time.strftime('%Y%m%d-%H%M%S')}"]  # one W&B group per lab
    zero_shot = evaluate_flags(flag_groups(passed))
    quick = ["--quickstart"] if args.quickstart else []
    if args.quickstart:
        zero_shot = [*quickstart_zero_shot(out, given), *zero_shot]
    last = ["--overwrite_output_dir"] if args.overwrite_output_dir else []
    scripts = REPO / "scripts"
    stages = {"original": [str(scripts / "evaluate.py"), *zero_shot]}
    for method, flags in extra.items():
        stages[method] = [str(scripts / f"train_{method}.py"), *quick, *passed, *flags]
    for stage, command in stages.items():
        _run(stage, [*launch, *command, *last, "--output_dir", str(out / stage)])
    runs = [x for stage in stages for x in ("--run", f"{stage}={out / stage}")]
    compare = [sys.executable, str(scripts / "compare.py"), *runs, "--num_samples", str(args.num_samples)]
    _run("comparison", [*compare, "--output_dir", str(out / "comparison")])
    return out / "comparison"


if __name__ == "__main__":
    run_cli(main)
