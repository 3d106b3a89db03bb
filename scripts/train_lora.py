"""LoRA fine-tuning (peft; default r=32, alpha=32, q/v, dropout 0.05) of a seq2seq model on dialogue summaries.

Only the adapter is trained and saved (~14 MB for flan-t5-base). Launch with accelerate:
  accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train_lora.py --quickstart --output_dir qs
"""

from dialogsum.cli import run_cli, training_main

if __name__ == "__main__":
    run_cli(training_main("lora", __doc__ or ""))
