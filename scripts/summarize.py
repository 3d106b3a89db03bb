"""Summarize new dialogues with a model (hub id or local folder), optionally with a LoRA adapter.

    echo "#Person1#: Hi! ... #Person2#: ..." | python scripts/summarize.py --model_name_or_path out/full
    python scripts/summarize.py --model_name_or_path google/flan-t5-base --adapter_path out/lora \
        --input_file dialogues.jsonl --output_file summaries.jsonl

Input: one dialogue as text (a file or stdin), or a .jsonl/.json/.csv/.parquet file with one per row.
Output: JSON lines {"id", "summary"}, batched like evaluation. The output is never written onto the input (or
into the model or adapter folder), and an existing --output_file is replaced only with --overwrite_output_file.
"""

from collections.abc import Sequence

from dialogsum.cli import run_cli
from dialogsum.inference import parse_summarize_args, run_summarize


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags and summarize."""
    run_summarize(parse_summarize_args(argv, __doc__ or ""))


if __name__ == "__main__":
    run_cli(main)
