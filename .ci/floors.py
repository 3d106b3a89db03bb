"""Print pip constraints pinning the API-critical dependencies of pyproject.toml to their floors (``pkg>=X`` ->
``pkg==X``), for the CI step that installs the oldest supported versions (``make floors``).

torch is left out: PyPI's Linux torch wheels are CUDA builds of several GB; the floor run uses the pinned CPU
build like every other install here. The other dependencies (plotting, tracking, numerics) are not pinned down:
their floors date from before Python 3.11 and do not install together on it.
"""

import re
import sys
import tomllib

#: The packages whose APIs the code calls in ways that changed across versions.
PINNED = ("accelerate", "transformers", "huggingface_hub", "datasets", "peft", "safetensors")

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as fh:
    dependencies = tomllib.load(fh)["project"]["dependencies"]
for dependency in dependencies:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dependency)
    if match and match.group(1) in PINNED:
        print(f"{match.group(1)}=={match.group(2)}")
