"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo): full and LoRA training with the real training scripts.

Checks what goes wrong in the wild: ZeRO-3 generation must finish (synced_gpus), the full model must be
saved consolidated (a plain ``from_pretrained`` folder), and the LoRA adapter must hold the trained values,
not empty ``Size([0])`` shards. DeepSpeed compiles a communication op on first use (~30 s, cached in
TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from test_distributed import (  # noqa: E402
    FAST,
    assert_ranks_identical,
    assert_saved_equals_trained,
    launch_recording,
)

pytestmark = pytest.mark.slow

#: PiSSA on every linear layer with rsLoRA (its test: assert_converted_adapter_reproduces_the_run)
PISSA = ["--init_lora_weights", "pissa_niter_2", "--use_rslora", "--lora_target_modules", "all-linear", "--lora_r", "4"]

CASES = [
    # (config, method, extra launch args, extra training args)
    # The command as is: the config's bf16, LoRA.
    ("deepspeed_zero2.yaml", "lora", [], []),
    # bf16 from an fp32 base: the saved model is DeepSpeed's fp32 master copy, as zero_to_fp32 gives it
    ("deepspeed_zero2.yaml", "full", [], ["--checkpointing_steps", "6"]),
    ("deepspeed_zero3.yaml", "full", ["--mixed_precision", "no"], []),
    # ZeRO-3 LoRA as DoRA (magnitudes from whole weights at creation, sharded after) with LoRA+ optimizer groups,
    # orthogonal initialisation
    (
        "deepspeed_zero3.yaml",
        "lora",
        [],
        ["--gradient_checkpointing", "--use_dora", "--loraplus_lr_ratio", "4", "--init_lora_weights", "orthogonal"],
    ),
    # PiSSA (base weights rewritten at creation) on every linear layer, rsLoRA: saved converted from the gathered state
    ("deepspeed_zero3.yaml", "lora", ["--mixed_precision", "no"], PISSA),
    ("deepspeed_zero3.yaml", "ia3", ["--mixed_precision", "no"], []),
]


def assert_saved_is_the_fp32_master(out: Path, method: str, trained: dict[str, torch.Tensor]) -> None:
    """Under bf16 the saved weights are fp32 and round to the bf16 values the model computed with (DeepSpeed
    copies its fp32 master weights into the model that way), and some carry more than bf16 holds."""
    from safetensors.torch import load_file

    saved = load_file(str(out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    common = [name for name in trained if name in saved]
    assert len(common) >= len(trained) - 1
    finer = 0
    for name in common:
        rounded = saved[name].to(torch.bfloat16).float()
        torch.testing.assert_close(rounded, trained[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        finer += int((saved[name] != rounded).sum())
    assert finer > 0, "no value finer than bf16: the 16-bit copy was saved"


def assert_converted_adapter_reproduces_the_run(out: Path, trained: dict[str, torch.Tensor], r: int, tmp_path: Path):
    """A PiSSA adapter trained under ZeRO-3 is saved as plain rank-2r LoRA against the original base: its first r
    rows of A (columns of B) are the trained ones, and evaluate.py on the untouched base model generates exactly the
    run's predictions."""
    import yaml
    from helpers import REPO, run_script
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(trained) and json.loads((out / "adapter_config.json").read_text())["r"] == 2 * r
    for name, value in trained.items():
        assert saved[name].shape[0 if "lora_A" in name else 1] == 2 * r
        torch.testing.assert_close(saved[name][:r] if "lora_A" in name else saved[name][:, :r], value, rtol=0, atol=0)
    settings = yaml.safe_load((out / "config.yaml").read_text())
    base, test_file = settings["model_name_or_path"], settings["test_file"]
    evaluation = tmp_path / "evaluation"
    proc = run_script(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model_name_or_path", base, "--adapter_path",
         str(out), "--test_file", test_file, "--max_test_samples", "7", "--output_dir", str(evaluation),
         "--max_source_length", str(settings["max_source_length"]), "--max_new_tokens", str(settings["max_new_tokens"]),
         "--report_to", "none"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def predictions(folder: Path) -> list[str]:
        return [json.loads(x)["prediction"] for x in (folder / "predictions.jsonl").read_text().splitlines()]

    assert predictions(evaluation) == predictions(out)


@pytest.mark.parametrize(
    ("config", "method", "launch_args", "train_args"),
    CASES,
    ids=[
        "zero2-lora-bf16",
        "zero2-full-bf16",
        "zero3-full",
        "zero3-dora-loraplus-orthogonal-gradient-checkpointing-bf16",
        "zero3-pissa-rslora-all-linear",
        "zero3-ia3",
    ],
)
def test_deepspeed_training(
    config: str, method: str, launch_args: list[str], train_args: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc, ranks = launch_recording(
        config,
        method,
        [*FAST, *train_args, "--output_dir", str(out)],
        tmp_path,
        launch_args=["--num_processes", "2", *launch_args],
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed_type"] == "DEEPSPEED"
    assert metrics["num_processes"] == 2
    assert metrics["train_steps"] == 6
    # Generation finished on both ranks (under ZeRO-3 it needs synced_gpus) and scored each dialogue once.
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert metrics["num_eval_examples"] == 7 and len(predictions) == 7
    assert_ranks_identical(ranks, world=2)
    bf16 = "--mixed_precision" not in launch_args  # the configs' own precision
    if train_args == PISSA:
        assert_converted_adapter_reproduces_the_run(out, ranks[0], r=4, tmp_path=tmp_path)
    elif not bf16:
        assert_saved_equals_trained(out, method, ranks[0])
    else:
        assert_saved_is_the_fp32_master(out, method, ranks[0])
    if "--use_dora" in train_args:
        assert any("lora_magnitude_vector" in name for name in ranks[0])
        assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
        assert json.loads((out / "metrics.json").read_text())["method_detail"].endswith("init=orthogonal LoRA+x4")
    if method == "full":
        from safetensors.torch import load_file
        from transformers import AutoModelForSeq2SeqLM

        assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
        model = AutoModelForSeq2SeqLM.from_pretrained(str(out))  # dtype "auto": the config's
        reloaded = {n: p.detach() for n, p in model.named_parameters()}
        assert {p.dtype for p in reloaded.values()} == {torch.float32}
        for name, value in ranks[0].items():
            expected = reloaded[name].to(torch.bfloat16).float() if bf16 else reloaded[name]
            torch.testing.assert_close(expected, value, rtol=0, atol=0)
    if bf16 and method == "full":
        # the same values as DeepSpeed's own recovery of the fp32 weights from the last checkpoint
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        recovered = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-6"), tag="pytorch_model")
        saved = load_file(str(out / "model.safetensors"))
        assert set(saved) <= set(recovered)
        for name, value in saved.items():
            torch.testing.assert_close(value, recovered[name].float(), rtol=0, atol=0)
