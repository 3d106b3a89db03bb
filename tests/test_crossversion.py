"""Every folder the project writes loads the same under the oldest supported transformers/peft (pyproject.toml's
floors, ``make floors`` -> .venv-floors) and under the newest installed here, in both directions.

One subprocess under the floors' Python loads the folders written here and writes its own, which are loaded here
(:mod:`crossversion`). CI (``.ci/run``) builds .venv-floors before the suite, so there a missing floors
environment fails this test; elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import crossversion
import pytest
from helpers import REPO, run_script, subprocess_env

FLOORS_PYTHON = REPO / ".venv-floors" / "bin" / "python"
#: Same torch on both sides: only summation order may differ (measured: at most 4e-5 on logits of about 20).
TOLERANCE = 1e-4


def _floors_python() -> Path:
    if FLOORS_PYTHON.is_file():
        return FLOORS_PYTHON
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{FLOORS_PYTHON} is missing: CI runs `make floors` before `make test`")
    pytest.skip("no .venv-floors (run `make floors` to build the oldest supported versions)")


def test_every_saved_folder_loads_the_same_under_the_floors_and_the_newest(
    tmp_path: Path, flan_t5_base_dir: Path, fresh_accelerate_state: None, one_thread: None
) -> None:
    floors_python = _floors_python()
    here, there = tmp_path / "saved_here", tmp_path / "saved_by_floors"
    crossversion.build_folders(here, str(flan_t5_base_dir))
    adapter_config = json.loads((here / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(here / "base")  # given as "base", recorded absolute
    expected_here = crossversion.probe_folders(here)

    proc = run_script(
        [str(floors_python), str(REPO / "tests" / "crossversion.py"), str(flan_t5_base_dir), str(here), str(there)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        cwd=tmp_path,  # the adapter's base was given relative to another folder: it must resolve from anywhere
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CROSSVERSION "))
    floors = json.loads(line.removeprefix("CROSSVERSION "))
    import peft
    import transformers

    # the two environments really are different versions
    assert floors["versions"]["transformers"].split(".")[0] != transformers.__version__.split(".")[0] or (
        floors["versions"]["peft"] != peft.__version__
    ), (floors["versions"], transformers.__version__, peft.__version__)

    loaded_here = crossversion.probe_folders(there)
    for direction, found in (
        ("saved here, loaded by the floors", crossversion.differences(expected_here, floors["loaded"])),
        ("saved by the floors, loaded here", crossversion.differences(floors["saved"], loaded_here)),
    ):
        print(direction, floors["versions"], json.dumps(found))  # the figures, with -s
        for name, diff in found.items():
            assert diff["same_tokenizer"], (direction, name)
            assert diff["max_logit_diff"] < TOLERANCE, (direction, name, diff)
            assert diff["same_argmax"] and diff["same_prediction"], (direction, name)
    # the adapter and LoRA matter (the comparisons are not of identical models), and the merge is the adapter
    assert expected_here["adapter"]["argmax"] != expected_here["full"]["argmax"]
    assert expected_here["merged"]["prediction_ids"] == expected_here["adapter"]["prediction_ids"]
