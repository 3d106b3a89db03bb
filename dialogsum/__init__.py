"""dialogsum: fine-tune FLAN-T5 on dialogue summarization (full and LoRA) with plain Accelerate loops."""

__version__ = "0.1.0"
