"""GPU check: the real flan-t5-base architecture (random weights) through every single-GPU launch path.

    python scripts/gpu_check.py                      # ../shared/models/flan-t5-base + ../shared/data/dialogsum
    python scripts/gpu_check.py --model_dir DIR --data_file FILE.jsonl --steps 30
    python scripts/gpu_check.py --cpu                # the same plan on CPU, to check it without a GPU

Full and LoRA with the shipped launcher configs (bf16, compiled): single GPU, DeepSpeed ZeRO-2/ZeRO-3 and FSDP
with one process, gradient checkpointing off/on; prints tokens/s, MFU, peak GPU memory, step time and whether the
run compiled (`--parallel N`: N runs at a time). Details: tools/gpu_check.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ lives in the checkout, not in the wheel

from tools.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    main()
