"""Soak test of stopping and resuming: 20 random SIGKILLs and 20 SIGTERMs across full/LoRA and 1/2 processes.

    python scripts/soak.py --workdir /tmp/soak --output_json soak.json

Trains the quick-start tiny T5 (dropout on) uninterrupted once per setup, then interrupts the same command with
--resume_from_checkpoint latest at random moments and restarts it until it finishes; checks that no checkpoint
on disk is corrupt and that every chain ends with the uninterrupted run's weights, log and train_loss, bit for
bit. Prints one line per chain and a summary; exits 1 if anything is wrong. See dialogsum/devtools/soak.py.
"""

from dialogsum.cli import run_cli
from dialogsum.devtools.soak import main

if __name__ == "__main__":
    run_cli(main)
