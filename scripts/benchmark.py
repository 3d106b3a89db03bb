"""Training and evaluation speed of dialogsum, side by side with the usual Accelerate loop, in one run.

    python scripts/benchmark.py --quick --model_dir ../shared/models/flan-t5-base \
        --data_file ../shared/data/dialogsum/dialogsum.dev.jsonl --output_json bench.json

Prints a table (s/step, real tokens/s, samples/s, padding, peak memory, speed-up over the reference loop, MFU)
and writes every figure to --output_json. See docs/benchmarks.md for the method and the figures of this project.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ lives in the checkout, not in the wheel

from dialogsum.cli import run_cli  # noqa: E402
from tools.benchmark import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
