"""Evaluate a model (hub id or local folder), optionally with a LoRA adapter, on a test or validation split.

Same prompt, generation and ROUGE as training; writes metrics.json and predictions.jsonl to --output_dir.
Given the original model, this is the zero-shot baseline:
    python scripts/evaluate.py --model_name_or_path google/flan-t5-base --output_dir out/zero_shot
    python scripts/evaluate.py --adapter_path out/lora --test_file test.jsonl --output_dir out/lora_eval
Several processes split the dialogues (each scored once):
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/evaluate.py ...
"""

from collections.abc import Sequence

from dialogsum.cli import run_cli
from dialogsum.inference import parse_evaluate_args, run_evaluation


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags and evaluate."""
    run_evaluation(parse_evaluate_args(argv, __doc__ or ""))


if __name__ == "__main__":
    run_cli(main)
