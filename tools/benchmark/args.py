"""The benchmark's flags (``scripts/benchmark.py --help``) and their checks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, NoReturn

from dialogsum.errors import ConfigError


def _flag(default: Any, text: str) -> Any:
    """A flag field: its default and its ``--help`` text."""
    return field(default=default, metadata={"help": text})


@dataclass
class BenchmarkArgs:
    """What to benchmark and how long: the flags of ``scripts/benchmark.py`` (``HfArgumentParser`` reads them)."""

    model_dir: str = field(
        metadata={"help": "Directory with a seq2seq config and tokenizer (weights if any; random weights otherwise)."}
    )
    data_file: str = field(metadata={"help": "DialogSum-format .jsonl/.json/.csv/.parquet file."})
    output_json: str | None = _flag(None, "Write the detailed results here (JSON).")
    quick: bool = _flag(
        False, "Short run: 2 steps, 16 summaries of 32 tokens; on a CPU 6 cases, on a GPU the headline cases."
    )
    full_grid: bool = _flag(False, "Every method x batching x precision (default unless --quick).")
    steps: int | None = _flag(None, "Measured training steps per case (default 4; 2 with --quick).")
    warmup_steps: int = _flag(1, "Steps run first in every case and excluded from the figures.")
    batch_size: int = _flag(8, "Training batch size, the same for every case.")
    max_source_length: int = _flag(512, "Prompt tokens kept (longer prompts are truncated).")
    max_target_length: int = _flag(128, "Summary tokens kept for training labels.")
    eval_samples: int | None = _flag(None, "Dialogues summarised in the evaluation test (default 32; 16 with --quick).")
    eval_batch_size: int = _flag(16, "Batch size of batched generation.")
    max_new_tokens: int | None = _flag(None, "Generated tokens per summary (default 64; 32 with --quick).")
    accelerate_config: str | None = _flag(
        None,
        "Launcher config whose mixed_precision defines our default path "
        "(default: accelerate_configs/cpu.yaml on CPU, single_gpu.yaml on GPU).",
    )
    token_budgets: list[int] = field(
        default_factory=lambda: [16384, 65536],
        metadata={"help": "Padded tokens per batch of the token-budget cases (on a GPU; --max_tokens_per_batch)."},
    )
    only: list[str] = field(
        default_factory=list,
        metadata={"help": "Run only these cases of the plan (names as in the table; figures that need others: n/a)."},
    )
    seed: int = _flag(42, "Seed of the sampler, the reference DataLoader and the model initialisation.")
    text_column: str = _flag("dialogue", "Column with the dialogue text.")
    summary_column: str = _flag("summary", "Column with the reference summary.")
    worker_timeout_s: int = _flag(3600, "Give up on one case after this many seconds.")


#: Defaults of the flags that ``--quick`` lowers: (without --quick, with --quick).
SIZE_DEFAULTS = {"steps": (4, 2), "eval_samples": (32, 16), "max_new_tokens": (64, 32)}
#: Flags that must be > 0.
POSITIVE = (
    "steps",
    "batch_size",
    "max_source_length",
    "max_target_length",
    "eval_samples",
    "eval_batch_size",
    "max_new_tokens",
    "worker_timeout_s",
)


def parse_args(argv: list[str] | None = None) -> BenchmarkArgs:
    """Parse and validate the flags (a bad flag or value is a :class:`ConfigError`, exit code 2)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> NoReturn:  # type: ignore[override]
            raise ConfigError(f"{message} (see --help)")

    parser = Parser(
        BenchmarkArgs,
        description="Training and evaluation speed of dialogsum against the usual Accelerate loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    (args,) = parser.parse_args_into_dataclasses(argv)
    for key, (full, quick) in SIZE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    for name in POSITIVE:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    smallest = args.max_source_length + args.max_target_length
    for budget in args.token_budgets:
        if budget < smallest:
            raise ConfigError(
                f"--token_budgets {budget} does not fit one example of {args.max_source_length} + "
                f"{args.max_target_length} tokens; use at least {smallest}"
            )
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    return args
