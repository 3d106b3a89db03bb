"""Run steps: output-folder safety, SageMaker result export, split planning."""

from __future__ import annotations

from pathlib import Path

import pytest

from dialogsum.config import parse_config
from dialogsum.errors import UserError
from dialogsum.run_folder import copy_results_for_sagemaker
from dialogsum.steps import needed_splits


def test_sagemaker_gets_results_but_not_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    (out / "plots").mkdir(parents=True)
    (out / "metrics.json").write_text('{"rouge1": 0.4}')
    (out / "plots" / "training.png").write_bytes(b"png")
    (out / "model.safetensors").write_bytes(b"weights")
    assert copy_results_for_sagemaker(out) is None  # not on SageMaker: nothing copied
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(tmp_path / "output"))
    dest = copy_results_for_sagemaker(out)
    assert dest == tmp_path / "output"
    assert (dest / "metrics.json").read_text() == '{"rouge1": 0.4}'
    assert (dest / "plots" / "training.png").is_file()
    assert not (dest / "model.safetensors").exists()


def test_needed_splits() -> None:
    assert needed_splits(parse_config(["--output_dir", "o"], "full")) == ["train", "test"]
    assert needed_splits(parse_config(["--output_dir", "o", "--eval_steps", "5"], "full")) == [
        "train",
        "validation",
        "test",
    ]
    assert needed_splits(parse_config(["--output_dir", "o", "--do_train", "false"], "full")) == ["test"]
    with pytest.raises(UserError, match="nothing to do"):
        needed_splits(parse_config(["--output_dir", "o", "--do_train", "false", "--do_eval", "false"], "full"))
