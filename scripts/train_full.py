"""Full fine-tuning of a seq2seq model (default google/flan-t5-base) on dialogue summarization.

Launch with accelerate (the config chooses CPU, GPU(s), DeepSpeed or FSDP):
  accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train_full.py --quickstart --output_dir qs
"""

from dialogsum.cli import run_cli, training_main

if __name__ == "__main__":
    run_cli(training_main("full", __doc__ or ""))
