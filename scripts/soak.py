"""Soak test of stopping and resuming: 20 random SIGKILLs and 20 SIGTERMs across full/LoRA and 1/2 processes.

    python scripts/soak.py --workdir /tmp/soak --output_json soak.json

Trains the quick-start tiny T5 (dropout on) uninterrupted once per setup, then interrupts the same command with
--resume_from_checkpoint latest at random moments and restarts it until it finishes; checks that no checkpoint
on disk is corrupt and that every chain ends with the uninterrupted run's weights, log and train_loss, bit for
bit. Prints one line per chain and a summary; exits 1 if anything is wrong. See tools/soak.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ lives in the checkout, not in the wheel

from dialogsum.cli import run_cli  # noqa: E402
from tools.soak import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
