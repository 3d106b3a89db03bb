"""Compare evaluated systems side by side: ROUGE with intervals, improvements, resources, sample outputs.

    python scripts/compare.py --run original=outputs/zero_shot --run full=outputs/full \
        --run lora=outputs/lora --output_dir outputs/comparison

The first --run is the baseline. Writes comparison.md (with rouge.png / resources.png) and comparison.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dialogsum.cli import FlagParser, run_cli
from dialogsum.comparison import compare_runs, render_terminal


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, compare the runs, print the table and the side-by-side samples."""
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="A result folder (metrics.json + predictions.jsonl); repeat; the first is the baseline.",
    )
    parser.add_argument("--output_dir", required=True, help="Where comparison.md/.json and the plots go.")
    parser.add_argument("--num_samples", type=int, default=3, help="Sample dialogues shown side by side.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the sample choice and the bootstrap.")
    parser.add_argument("--n_resamples", type=int, default=1000, help="Bootstrap resamples.")
    args = parser.parse_args(argv)
    comparison = compare_runs(args.run, args.output_dir, args.num_samples, args.seed, args.n_resamples)
    sys.stdout.write(render_terminal(comparison))
    sys.stdout.write(f"\nwrote {args.output_dir}/comparison.md and comparison.json\n")


if __name__ == "__main__":
    run_cli(main)
