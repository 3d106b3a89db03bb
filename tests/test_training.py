"""The loop on a tiny T5 in-process: pinned CPU fp32 losses, accumulation equivalence, LR schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import script_main
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _train(method: str, out: Path, model_dir: Path, data_dir: Path, *extra: str) -> dict:
    argv = [
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--test_file",
        str(data_dir / "test.jsonl"),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_source_length",
        "96",
        "--max_target_length",
        "32",
        "--max_new_tokens",
        "24",
        "--seed",
        "0",
        *extra,
    ]
    return script_main(f"train_{method}")(argv)


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log_history.jsonl").read_text().splitlines()) if "loss" in e]


# CPU fp32 losses of the first 6 optimizer steps (batch 8, lr 3e-3 / 1e-2, seed 0) on the quick-start model.
# A change here means the loop, the data order, the loss or the optimizer changed: check it was intended.
PINNED = {
    "full": [21.559074, 15.989754, 10.685678, 9.383722, 7.566678, 6.726398],
    "lora": [21.559074, 17.716005, 12.722043, 11.683972, 10.166093, 9.233046],
}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_pinned_cpu_fp32_losses(method: str, tmp_path: Path, quickstart_assets: tuple[Path, Path]) -> None:
    lr = "3e-3" if method == "full" else "1e-2"
    metrics = _train(
        method,
        tmp_path / method,
        *quickstart_assets,
        "--max_train_steps",
        "6",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        lr,
        "--do_eval",
        "false",
    )
    losses = _losses(tmp_path / method)
    assert len(losses) == 6
    assert losses == pytest.approx(PINNED[method], rel=1e-3)
    assert metrics["train_steps"] == 6


def test_accumulation_matches_a_bigger_batch(tmp_path: Path, quickstart_assets: tuple[Path, Path]) -> None:
    common = (
        "--max_train_steps",
        "3",
        "--group_by_length",
        "false",
        "--learning_rate",
        "1e-3",
        "--do_eval",
        "false",
        "--logging_steps",
        "1",
        "--max_grad_norm",
        "1e9",
    )
    _train("full", tmp_path / "b8", *quickstart_assets, "--per_device_train_batch_size", "8", *common)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _train(
        "full",
        tmp_path / "b4x2",
        *quickstart_assets,
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        *common,
    )
    a = load_file(str(tmp_path / "b8" / "model.safetensors"))
    b = load_file(str(tmp_path / "b4x2" / "model.safetensors"))
    start = load_file(str(quickstart_assets[0] / "model.safetensors"))
    assert a.keys() == b.keys()
    delta_a = torch.cat([(a[k] - start[k]).flatten() for k in sorted(a)])
    delta_b = torch.cat([(b[k] - start[k]).flatten() for k in sorted(a)])
    assert delta_a.norm() > 1e-2  # training did something
    # the loss is token-weighted over the accumulation window, so the steps are the same up to rounding (Adam
    # amplifies rounding on near-zero gradients: compare whole updates)
    assert (delta_a - delta_b).norm() / delta_a.norm() < 1e-4
    logs_a = [json.loads(x) for x in (tmp_path / "b8" / "log_history.jsonl").read_text().splitlines()]
    logs_b = [json.loads(x) for x in (tmp_path / "b4x2" / "log_history.jsonl").read_text().splitlines()]
    # same examples per optimizer step: same loss, and the accumulated gradient has the big batch's norm
    assert [e["loss"] for e in logs_a] == pytest.approx([e["loss"] for e in logs_b], rel=1e-5)
    assert [e["grad_norm"] for e in logs_a] == pytest.approx([e["grad_norm"] for e in logs_b], rel=1e-5)
    assert logs_a[0]["samples_per_s"] > 0 and logs_b[0]["samples_per_s"] > 0


def test_schedule_steps_once_per_optimizer_step(tmp_path: Path, quickstart_assets: tuple[Path, Path]) -> None:
    _train(
        "lora",
        tmp_path / "sched",
        *quickstart_assets,
        "--max_train_steps",
        "8",
        "--num_warmup_steps",
        "4",
        "--learning_rate",
        "1e-3",
        "--gradient_accumulation_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--do_eval",
        "false",
    )
    lrs = [
        e["learning_rate"] for e in map(json.loads, (tmp_path / "sched" / "log_history.jsonl").read_text().splitlines())
    ]
    # linear warm-up over 4 steps to 1e-3, then linear decay to 0 at step 8
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_label_smoothing_is_applied_per_target_token(tiny_model_dir: Path, one_thread: None) -> None:
    """The smoothed loss is (1 - e) * NLL + e * mean over the vocabulary of -log p, per target token, averaged
    over the tokens whose label is not -100; the decoder inputs are the labels shifted right, as T5 builds them."""
    from accelerate import Accelerator
    from transformers import AutoModelForSeq2SeqLM

    from dialogsum.training import loss_function

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir)).eval()
    labels = torch.randint(2, model.config.vocab_size, (3, 7))
    labels[0, 4:] = -100  # padding of the shorter summaries
    labels[2, 2:] = -100
    batch = {"input_ids": torch.randint(2, model.config.vocab_size, (3, 9)), "labels": labels}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    accelerator = Accelerator(cpu=True)
    plain = loss_function(accelerator, model, 0.0)(dict(batch))
    smoothed = loss_function(accelerator, model, 0.1)(dict(batch))

    reference = model(**batch)  # the model shifts the labels itself
    assert plain.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    log_p = reference.logits.double().log_softmax(-1)
    real = labels != -100
    nll = -log_p.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    uniform = -log_p.mean(-1)
    expected = ((0.9 * nll + 0.1 * uniform) * real).sum() / real.sum()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)
    assert smoothed.item() != pytest.approx(plain.item(), rel=1e-3)


def test_adafactor_uses_t5_settings_and_factored_state(tiny_model_dir: Path, one_thread: None) -> None:
    from transformers import AutoModelForSeq2SeqLM
    from transformers.optimization import Adafactor

    from dialogsum.config import build_config
    from dialogsum.training import build_optimizer

    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))
    cfg = build_config("full", {"optim": "adafactor", "output_dir": "x"})
    assert cfg.learning_rate == 1e-3  # T5's usual fixed Adafactor lr when none is given
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, Adafactor)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (
        1e-3,
        False,
        False,
        False,
    )
    assert group["beta1"] is None and group["weight_decay"] == 0.01
    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "labels": torch.tensor([[8, 9, 1]])}
    model(**batch).loss.backward()
    optimizer.step()
    matrix = model.get_parameter("encoder.block.0.layer.0.SelfAttention.q.weight")
    state = optimizer.state[matrix]
    assert state["exp_avg_sq_row"].shape == (matrix.shape[0],) and state["exp_avg_sq_col"].shape == (matrix.shape[1],)
    assert "exp_avg" not in state and "exp_avg_sq" not in state


def test_adafactor_is_refused_under_deepspeed_optimizer_offload() -> None:
    """accelerate would swap it for DeepSpeed's CPU Adam: refused with one line, before anything loads."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from dialogsum.errors import UserError
    from dialogsum.training import check_optimizer

    def accelerator(offload: str) -> SimpleNamespace:
        plugin = DeepSpeedPlugin(zero_stage=3, offload_optimizer_device=offload, offload_param_device=offload)
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))

    check_optimizer(accelerator("none"), "adafactor")
    check_optimizer(accelerator("cpu"), "adamw")
    check_optimizer(SimpleNamespace(state=SimpleNamespace()), "adafactor")  # no DeepSpeed
    with pytest.raises(UserError, match=r"^--optim adafactor cannot run with DeepSpeed's optimizer offload "):
        check_optimizer(accelerator("cpu"), "adafactor")
