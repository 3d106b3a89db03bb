"""Developer tools of the repository, apart from the training library (the wheel ships ``dialogsum`` only).

* :mod:`tools.benchmark`: training and evaluation speed against the usual Accelerate loop (``scripts/benchmark.py``);
* :mod:`tools.gpu_check`: every single-GPU launch path with the real flan-t5-base architecture
  (``scripts/gpu_check.py``);
* :mod:`tools.gpu_session`: both of them as one prepared, time-boxed run on a lent GPU machine
  (``python -m tools.gpu_session prepare`` here, ``python3 -m tools.gpu_session run`` there);
* :mod:`tools.soak`: random kills and resumes against uninterrupted runs (``scripts/soak.py``);
* :mod:`tools.flops`: the one FLOP/MFU formula of the benchmark and the GPU check.

They run from a checkout: the scripts put the repository root on ``sys.path``, and ``python -m tools...`` works
from the repository root.
"""

from pathlib import Path

#: The repository root (these tools use its scripts/ and accelerate_configs/).
REPO = Path(__file__).resolve().parents[1]
