"""Token-weighted loss: the same optimizer steps whatever the split into micro-batches, accumulation and processes.

The quick-start tiny T5 (fp32, no dropout) trains 4 optimizer steps of 8 examples on rows whose summaries differ
in length up to 6x, in plain random batch order (so every split sees the same 8 examples per step). Splits are
per-device batch x accumulation x processes: 8x1x1, 4x2x1, 2x4x1 (one process), 4x1x2, 2x2x2 (two gloo processes),
for full fine-tuning and LoRA, plus 2x2x2 under DeepSpeed ZeRO-2, and 8x1x1 vs 2x2x2 with label smoothing 0.1.
Each split is one real ``accelerate launch`` of the training script; its saved weights, logged losses and
``train_loss`` must match those of the 8x1x1 run (of the smoothed 8x1x1 run for the smoothed split).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_script, subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

#: name -> (per-device batch, accumulation steps, processes); 8 examples per optimizer step in each
SPLITS = {"8x1x1": (8, 1, 1), "4x2x1": (4, 2, 1), "2x4x1": (2, 4, 1), "4x1x2": (4, 1, 2), "2x2x2": (2, 2, 2)}
ZERO2 = "2x2x2-zero2"
#: --label_smoothing_factor 0.1 runs: the smoothed per-token losses are token-weighted the same way
SMOOTHED = ("8x1x1-smooth", "2x2x2-smooth")
STEPS = 4
#: the largest relative difference allowed between two splits' weights (:func:`relative_differences`), logged
#: losses and train_loss
TOLERANCE = 1e-5
#: ... and for single elements: Adam divides each gradient by its own running magnitude, so on the few elements
#: whose gradient nearly cancels out, rounding differences of the summation order grow to ~1e-4 of a tensor's
#: largest value (a mean of per-micro-batch means gives differences of 3% for full fine-tuning, 170% for LoRA)
ELEMENT_TOLERANCE = 1e-3
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Over the tensors of ``a`` (a ZeRO-2 model also saves the tied embedding copies): the largest
    ``||a - b|| / ||a||`` of a tensor, and the largest ``|a - b|`` of an element relative to its tensor's largest
    ``|a|``."""
    assert a.keys() <= b.keys()
    tensor = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)
    element = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    return tensor, element


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Two splits' weights agree (:data:`TOLERANCE`, :data:`ELEMENT_TOLERANCE`)."""
    tensor, element = relative_differences(a, b)
    assert tensor <= TOLERANCE and element <= ELEMENT_TOLERANCE, f"{what}: {tensor:.2e} (tensor), {element:.2e}"


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> Path:
    """48 training rows whose summaries are the quick-start summary said 1 to 6 times (12 to ~80 tokens)."""
    rows = [json.loads(x) for x in (synthetic_data_dir / "train.jsonl").read_text().splitlines()[:48]]
    for i, row in enumerate(rows):
        row["summary"] = " ".join([row["summary"]] * (1 + (i * 7) % 6))
    path = tmp_path_factory.mktemp("uneven") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(method: str, split: str, model: Path, data: Path, out: Path) -> Path:
    batch, accumulation, processes = SPLITS[split.removesuffix("-zero2").removesuffix("-smooth")]
    config = "deepspeed_zero2.yaml" if split == ZERO2 else "multi_cpu.yaml" if processes == 2 else "cpu.yaml"
    launch = ["--config_file", str(REPO / "accelerate_configs" / config)]
    launch += ["--num_processes", str(processes), "--mixed_precision", "no"]
    args = [
        *("--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out)),
        *("--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation)),
        *("--max_train_steps", str(STEPS), "--group_by_length", "false", "--learning_rate", "1e-3"),
        *("--logging_steps", "1", "--do_eval", "false", "--report_to", "none", "--seed", "0"),
        *("--max_source_length", "96", "--max_target_length", "128"),
        *(("--lora_dropout", "0") if method == "lora" else ()),
        *(("--label_smoothing_factor", "0.1") if split in SMOOTHED else ()),
    ]
    script = str(REPO / "scripts" / f"train_{method}.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, script, *args]
    from test_distributed import TORCH_EXTENSIONS_DIR

    env = subprocess_env(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR)
    proc = run_script(cmd, env=env)
    assert proc.returncode == 0, f"{method} {split}: {proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, uneven_data: Path) -> dict[tuple, Path]:
    """Every (method, split) run, two at a time (the 2-core machine's two processes)."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config.get("dropout_rate", 0.0) == 0.0  # otherwise the splits would draw different dropout masks
    root = tmp_path_factory.mktemp("splits")
    jobs = [(m, s) for m in WEIGHTS for s in SPLITS] + [("full", ZERO2)] + [("full", s) for s in SMOOTHED]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            job: pool.submit(_train, *job, tiny_model_dir, uneven_data, root / f"{job[0]}-{job[1]}") for job in jobs
        }
        return {job: future.result() for job, future in futures.items()}


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log_history.jsonl").read_text().splitlines()) if "loss" in e]


def _train_loss(out: Path) -> float:
    return json.loads((out / "metrics.json").read_text())["train_loss"]


@pytest.mark.parametrize("method", list(WEIGHTS))
def test_every_split_takes_the_same_optimizer_steps(method: str, runs: dict[tuple, Path], tiny_model_dir: Path):
    reference = runs[(method, "8x1x1")]
    ref = load_file(str(reference / WEIGHTS[method]))
    if method == "full":  # training moved the weights far more than the tolerance
        start = load_file(str(tiny_model_dir / "model.safetensors"))
        assert relative_differences({k: start[k] for k in ref}, ref)[0] > 100 * TOLERANCE
    else:
        assert all(float(t.abs().max()) > 0 for n, t in ref.items() if "lora_B" in n)  # B left its zero init
    for split in SPLITS:
        assert_same_weights(ref, load_file(str(runs[(method, split)] / WEIGHTS[method])), f"{method} {split}")
    losses = {split: _losses(runs[(method, split)]) for split in SPLITS}
    assert all(len(v) == STEPS for v in losses.values())
    for split, values in losses.items():
        assert values == pytest.approx(losses["8x1x1"], rel=TOLERANCE), (split, values, losses["8x1x1"])
        assert _train_loss(runs[(method, split)]) == pytest.approx(_train_loss(reference), rel=TOLERANCE)


def test_deepspeed_zero2_takes_the_same_optimizer_steps(runs: dict[tuple, Path]) -> None:
    ref = load_file(str(runs[("full", "8x1x1")] / WEIGHTS["full"]))
    got = load_file(str(runs[("full", ZERO2)] / WEIGHTS["full"]))
    assert_same_weights(ref, got, ZERO2)
    assert _losses(runs[("full", ZERO2)]) == pytest.approx(_losses(runs[("full", "8x1x1")]), rel=TOLERANCE)


def test_label_smoothing_takes_the_same_optimizer_steps(runs: dict[tuple, Path]) -> None:
    ref = load_file(str(runs[("full", SMOOTHED[0])] / WEIGHTS["full"]))
    assert_same_weights(ref, load_file(str(runs[("full", SMOOTHED[1])] / WEIGHTS["full"])), SMOOTHED[1])
    smoothed = {split: _losses(runs[("full", split)]) for split in SMOOTHED}
    assert smoothed[SMOOTHED[1]] == pytest.approx(smoothed[SMOOTHED[0]], rel=TOLERANCE)
    assert _train_loss(runs[("full", SMOOTHED[1])]) == pytest.approx(
        _train_loss(runs[("full", SMOOTHED[0])]), rel=TOLERANCE
    )
    # smoothing changed the objective: the first loss (same weights, same batch) is not the plain one
    assert smoothed[SMOOTHED[0]][0] != pytest.approx(_losses(runs[("full", "8x1x1")])[0], rel=1e-4)
