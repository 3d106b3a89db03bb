"""Compiled training (the GPU launcher configs' torch.compile) gives the eager run's results, on the CPU.

The launcher config is cpu.yaml with the ``dynamo_config`` of single_gpu.yaml (inductor, regional compilation:
what every GPU config ships) and fp32. The quick-start tiny T5 (2 layers, no dropout; LoRA with
``--lora_dropout 0``: compiled code draws other random numbers than eager code) trains 20 steps of 8 examples
through the unchanged scripts, compiled and eager, then generates for 4 test dialogues. Compiled, the batches
are padded to length buckets (``--length_buckets auto``) and the eager ones are not, so the comparison also shows
that bucket padding does not change the loss.

Compiling the tiny model on 2 CPU cores takes ~1 to 1.5 minutes per method when torch's compile cache
(/tmp/torchinductor_<user>) is cold, ~15 s when warm.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, run_script, subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CONFIGS = REPO / "accelerate_configs"
LEARNING_RATE = {"full": "3e-3", "lora": "1e-2"}
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


def _compiled_config(folder: Path) -> Path:
    """cpu.yaml compiling as the GPU configs do, in fp32."""
    config = yaml.safe_load((CONFIGS / "cpu.yaml").read_text())
    config["dynamo_config"] = yaml.safe_load((CONFIGS / "single_gpu.yaml").read_text())["dynamo_config"]
    config["mixed_precision"] = "no"
    path = folder / "cpu_compiled.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, method: str, model: Path, data: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--mixed_precision", "no", "--num_cpu_threads_per_process", "1"]
    cmd += [str(REPO / "scripts" / f"train_{method}.py"), "--model_name_or_path", str(model)]
    cmd += ["--train_file", str(data / "train.jsonl"), "--test_file", str(data / "test.jsonl")]
    cmd += ["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "20", "--logging_steps", "1"]
    cmd += ["--per_device_train_batch_size", "8", "--learning_rate", LEARNING_RATE[method], "--lora_dropout", "0"]
    cmd += ["--max_source_length", "96", "--max_target_length", "32", "--max_test_samples", "4"]
    cmd += ["--max_new_tokens", "8", *extra]
    proc = run_script(cmd, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> dict[str, dict]:
    """{method: {compiled, eager, resumed: output folder, *_log: stderr}}; the two compiled runs side by side."""
    model, data = quickstart_assets
    root = tmp_path_factory.mktemp("compile")
    compiled = _compiled_config(root)
    eager = CONFIGS / "cpu.yaml"
    found: dict[str, dict] = {m: {} for m in ("full", "lora")}

    def both(config: Path, kind: str, method: str) -> None:
        out = root / f"{method}-{kind}"
        extra = ("--checkpointing_steps", "10") if kind == "compiled" else ()
        found[method][kind] = out
        found[method][f"{kind}_log"] = _run(config, method, model, data, out, *extra)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for kind, config in (("compiled", compiled), ("eager", eager)):
            list(pool.map(lambda m, c=config, k=kind: both(c, k, m), ("full", "lora")))
    # full fine-tuning, compiled, resumed into a new output folder from its checkpoint-10 (the log comes along)
    ref, resumed = found["full"]["compiled"], root / "full-resumed"
    checkpoint = str(ref / "checkpoint-10")
    _run(compiled, "full", model, data, resumed, "--checkpointing_steps", "10", "--resume_from_checkpoint", checkpoint)
    found["full"]["resumed"] = resumed
    return found


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log_history.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_losses_match_eager_over_20_steps(method: str, runs: dict[str, dict]) -> None:
    compiled, eager = _losses(runs[method]["compiled"]), _losses(runs[method]["eager"])
    assert len(compiled) == len(eager) == 20
    assert compiled == pytest.approx(eager, rel=1e-4)  # measured: 2e-6 (other fusion, same math)
    assert compiled[-1] < compiled[0] / 3  # and it learns


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_run_compiles_with_length_buckets_and_no_recompile_limit(method: str, runs: dict[str, dict]) -> None:
    log, eager_log = runs[method]["compiled_log"], runs[method]["eager_log"]
    assert "compiling the model: inductor, mode default, regional" in log
    assert "length buckets: prompts padded to one of 16, 24, 32, 48, 64, 96 tokens" in log
    assert "length buckets" not in eager_log and "compiling the model" not in eager_log
    # generation after training runs eagerly: compiled, every decoding step would recompile up to torch's limit
    assert "recompile_limit" not in log


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_model_saves_under_its_plain_names(method: str, runs: dict[str, dict]) -> None:
    compiled = load_file(str(runs[method]["compiled"] / WEIGHTS[method]))
    eager = load_file(str(runs[method]["eager"] / WEIGHTS[method]))
    assert compiled.keys() == eager.keys() and not any("_orig_mod" in k for k in compiled)
    for k in eager:
        assert float((compiled[k] - eager[k]).norm() / eager[k].norm().clamp_min(1e-12)) < 1e-3, k
    for kind in ("compiled", "eager"):
        rows = (runs[method][kind] / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == 4


def test_compiled_model_reloads_with_from_pretrained(runs: dict[str, dict]) -> None:
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(runs["full"]["compiled"]))
    saved = load_file(str(runs["full"]["compiled"] / "model.safetensors"))
    assert torch.equal(model.state_dict()["lm_head.weight"], saved["lm_head.weight"])


def test_compiled_run_resumes_bit_for_bit(runs: dict[str, dict]) -> None:
    ref, resumed = runs["full"]["compiled"], runs["full"]["resumed"]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(resumed) == _losses(ref)
