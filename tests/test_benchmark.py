"""The benchmark: runs end to end on the tiny model with sane figures; FLOP count; CPU precision choice.

No timing is asserted: speed is a benchmark figure (docs/benchmarks.md), not a test.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_TIMEOUT_S, REPO, run_script

from dialogsum.errors import ConfigError, UserError
from dialogsum.precision import cpu_bf16_feature, resolve_cpu_precision
from tools.benchmark import parse_args, plan_cases
from tools.benchmark.launch import CONFIG_DIR, worker_env
from tools.benchmark.pool import _representative_batches
from tools.flops import T5Dims, forward_flops, training_flops, training_flops_per_token

# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> dict:
    """``scripts/benchmark.py --quick`` on the quick-start tiny T5 and its synthetic data (real processes)."""
    model_dir, data_dir = quickstart_assets
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_script(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            "--quick",
            "--model_dir",
            str(model_dir),
            "--data_file",
            str(data_dir / "train.jsonl"),
            "--output_json",
            str(out),
            "--steps",
            "4",
            "--max_source_length",
            "96",
            "--eval_samples",
            "6",
            "--eval_batch_size",
            "4",
            "--max_new_tokens",
            "8",
        ],
        timeout=HANG_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    results["_stdout"] = proc.stdout
    return results


def test_quick_run_prints_the_table(quick_results: dict) -> None:
    stdout = quick_results["_stdout"]
    assert "| case | s/step | real tok/s |" in stdout
    for row in quick_results["rows"]:
        assert f"| {row['name']} |" in stdout
    assert "train_speedup_vs_reference:" in stdout and "eval_speedup:" in stdout and "mfu:" in stdout


def test_quick_run_json_has_sane_headline_figures(quick_results: dict) -> None:
    r = quick_results
    assert r["train_speedup_vs_reference"] > 0
    assert r["eval_speedup"] > 0
    assert 0 < r["mfu"] <= 1
    assert set(r["targets"]) == {"train_speedup_vs_reference", "train_speedup_vs_reference_fp32", "eval_speedup", "mfu"}
    assert r["device"]["type"] == "cpu" and r["device"]["name"]
    fp32 = next(row for row in r["rows"] if row["name"] == "full-grouped-fp32")
    assert r["train_speedup_vs_reference_fp32"] == fp32["speedup_vs_reference"]
    lora = next(row for row in r["rows"] if row["name"].startswith("lora-grouped-"))
    assert r["lora_speedup_vs_reference"] == lora["speedup_vs_reference"] > 0
    # not measured on a CPU: no compiled cases (compiling flan-t5-base here is slow and does not pay), no budgets
    assert r["token_budget_mfu"] is None and r["compile_seconds"] is None and r["compile"] == []
    assert r["failed"] == {} and r["not_run"] == []
    assert all(not row["compiled"] and not row["length_buckets"] for row in r["rows"])
    for target in r["targets"].values():
        assert target["met"] == (target["measured"] >= target["target"])
    assert r["precision"]["chosen"] in ("no", "bf16")
    assert r["mfu_definition"].startswith("model FLOPs")
    assert 0 <= r["padding"]["epoch_grouped"] <= 1 and 0 <= r["padding"]["epoch_random"] <= 1
    assert r["padding"]["epoch_grouped"] <= r["padding"]["epoch_random"]


def test_quick_run_rows(quick_results: dict) -> None:
    rows = {row["name"]: row for row in quick_results["rows"]}
    default = quick_results["default_path"]
    other = "bf16" if quick_results["precision"]["chosen"] == "no" else "fp32"
    precision = "fp32" if quick_results["precision"]["chosen"] == "no" else "bf16"
    assert set(rows) == {
        "reference",
        default,
        f"full-grouped-{other}",
        f"full-random-{precision}",
        f"lora-grouped-{precision}",
        f"{default}-gc",
    }
    assert rows["reference"]["speedup_vs_reference"] == 1.0
    assert rows["reference"]["loop"] == "reference" and rows["reference"]["precision"] == "fp32"
    for row in rows.values():
        assert row["steps"] == 4 and len(row["losses"]) == 5  # 1 warm-up + 4 measured
        assert all(math.isfinite(x) for x in row["losses"])
        assert row["s_per_step"] > 0 and row["tokens_per_s"] > 0 and row["samples_per_s"] > 0
        assert 0 <= row["padding_fraction"] <= 1
        assert row["peak_memory_mb"] > 0 and row["memory_vs_reference"] > 0
        assert row["speedup_vs_reference"] > 0
        assert 0 < row["mfu"] <= 1
        assert row["matmul_peak_gflops"] > 0 and row["threads"] >= 1
    # every case trains on the same pool of 5 batches of 8; the warm-up batch (excluded) differs with the order
    assert all(row["samples"] == 32 for row in rows.values())
    # figures keep 4 significant digits however fast the machine (2 rounded figures: within 1e-3 of each other)
    for row in rows.values():
        assert row["samples_per_s"] == pytest.approx(row["samples"] / row["seconds"], rel=1e-3)
        assert row["s_per_step"] == pytest.approx(row["seconds"] / row["steps"], rel=1e-3)
        assert row["tokens_per_s"] == pytest.approx(row["real_tokens"] / row["seconds"], rel=1e-3)
    assert rows[f"lora-grouped-{precision}"]["trainable_params"] < rows[default]["trainable_params"]
    assert rows[default]["trainable_params"] == rows[default]["total_params"]


def test_quick_run_comparisons_and_eval(quick_results: dict) -> None:
    comps = quick_results["comparisons"]
    for key in ("grouped_vs_random", "bf16_vs_fp32", "lora_vs_full", "gradient_checkpointing_vs_off"):
        assert comps[key]["speedup"] > 0 and comps[key]["memory_ratio"] > 0 and comps[key]["step_time_ratio"] > 0
    ev = quick_results["eval"]
    assert ev["dialogues"] == 6 and ev["max_new_tokens"] == 8 and ev["num_beams"] == 1
    assert ev["batched_summaries_per_s"] > 0 and ev["one_at_a_time_summaries_per_s"] > 0
    assert ev["eval_speedup"] == pytest.approx(ev["one_at_a_time_s"] / ev["batched_s"], rel=1e-3)


def test_bf16_loss_curve_tracks_fp32_on_the_tiny_model(quick_results: dict) -> None:
    """Same model, same batches, bf16 autocast vs fp32: the loss curves agree closely (numerically sane)."""
    check = quick_results["bf16_loss_check"]
    fp32, bf16 = check["fp32_losses"], check["bf16_losses"]
    assert len(fp32) == len(bf16) == 5
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert check["max_rel_diff"] < 0.02


# --------------------------------------------------------------------------------------------- GPU plan

GPU_QUICK = [
    "reference",
    "full-grouped-bf16-compiled",  # the default path: single_gpu.yaml compiles, bf16, with length buckets
    "full-grouped-bf16",
    "full-grouped-fp32",
    "full-grouped-fp32-compiled",
    "full-grouped-bf16-compiled-nobuckets",
    "lora-grouped-bf16-compiled",
    "full-budget16k-bf16-compiled",
    "full-budget64k-bf16-compiled",
]


def test_gpu_plan_covers_eager_compiled_buckets_lora_budgets_and_zero2() -> None:
    quick = plan_cases("bf16", False, compiled=True, gpu=True, token_budgets=(16384, 65536))
    assert [c.name for c in quick] == GPU_QUICK
    default = quick[1]
    assert default.compiled and default.buckets and default.with_eval and not default.force_precision
    assert [c.max_tokens for c in quick if c.batching == "budget"] == [16384, 65536]
    # buckets go with compiling (--length_buckets auto), except in the case that measures them off
    assert all(c.buckets == c.compiled for c in quick if not c.name.endswith("-nobuckets"))
    full = plan_cases("bf16", True, compiled=True, gpu=True, token_budgets=(16384, 65536))
    extra = {c.name: c for c in full[len(quick) :]}
    assert [c.name for c in full[: len(quick)]] == GPU_QUICK
    assert set(extra) == {
        "lora-grouped-bf16",
        "full-random-bf16-compiled",
        "zero2-full-grouped-bf16-compiled",
        "full-grouped-bf16-compiled-gc",
    }
    assert extra["zero2-full-grouped-bf16-compiled"].launch_config == "deepspeed_zero2.yaml"
    assert not next(c for c in quick if c.name == "full-grouped-bf16-compiled-nobuckets").buckets
    # a CPU plan stays as it was: eager, six cases
    cpu = plan_cases("no", False)
    assert [c.name for c in cpu] == [
        "reference",
        "full-grouped-fp32",
        "full-grouped-bf16",
        "full-random-fp32",
        "lora-grouped-fp32",
        "full-grouped-fp32-gc",
    ]


def test_case_processes_get_what_accelerate_launch_exports() -> None:
    cases = {c.name: c for c in plan_cases("bf16", True, compiled=True, gpu=True, token_budgets=(16384,))}
    gpu = CONFIG_DIR / "single_gpu.yaml"
    default = worker_env(cases["full-grouped-bf16-compiled"], gpu)
    assert default["ACCELERATE_MIXED_PRECISION"] == "bf16" and default["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"
    assert default["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] == "True"
    assert default["ACCELERATE_DYNAMO_USE_DYNAMIC"] == "True" and default["WORLD_SIZE"] is None
    eager = worker_env(cases["full-grouped-fp32"], gpu)
    assert eager["ACCELERATE_DYNAMO_BACKEND"] == "NO" and eager["ACCELERATE_MIXED_PRECISION"] == "no"
    zero2 = worker_env(cases["zero2-full-grouped-bf16-compiled"], gpu)
    assert zero2["ACCELERATE_USE_DEEPSPEED"] == "true" and zero2["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert zero2["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"  # passed on, as build_accelerator does for DeepSpeed
    assert (zero2["WORLD_SIZE"], zero2["RANK"], zero2["MASTER_ADDR"]) == ("1", "0", "127.0.0.1")
    reference = worker_env(cases["reference"], gpu)
    assert reference["ACCELERATE_MIXED_PRECISION"] == "no"
    assert all(
        v is None for k, v in reference.items() if k.startswith("ACCELERATE_") and k != "ACCELERATE_MIXED_PRECISION"
    )


def test_compiled_token_budget_case_runs_and_reports_compile_time(
    tmp_path: Path, tiny_model_dir: Path, synthetic_data_dir: Path
) -> None:
    """One compiled, bucketed token-budget case of the GPU plan, run on the CPU with the tiny model (compiled with
    aot_eager): compile time is measured on its own and the measured steps are the budget's batches."""
    import subprocess

    from dialogsum.config import DataArguments
    from dialogsum.data import read_rows, tokenize_rows
    from dialogsum.modeling import load_tokenizer

    case = next(c for c in plan_cases("no", False, True, True, (1024,)) if c.batching == "budget")
    assert case.name == "full-budget1k-fp32-compiled" and case.compiled and case.buckets
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = read_rows(synthetic_data_dir / "train.jsonl")[:64]
    dataset, _ = tokenize_rows(rows, tokenizer, DataArguments(max_source_length=96, max_target_length=32))
    data = {"input_ids": dataset.input_ids, "labels": dataset.labels}
    spec = {
        "model_path": str(tiny_model_dir),
        "tokenizer_path": str(tiny_model_dir),
        "pad_token_id": tokenizer.pad_token_id,
        "seed": 0,
        "steps": 3,
        "warmup_steps": 2,
        "batch_size": 8,
        "max_source_length": 96,
        "max_target_length": 32,
        "pool": data,
        "dataset": data,
        "case": {k: getattr(case, k) for k in case.__dataclass_fields__},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    changes = worker_env(case, CONFIG_DIR / "cpu.yaml")
    env.update({k: v for k, v in changes.items() if v is not None})
    # aot_eager: dynamo and autograd tracing without inductor's code generation (compiles in seconds here);
    # inductor itself is checked in test_compile.py
    assert env["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"
    env.update(ACCELERATE_DYNAMO_BACKEND="AOT_EAGER", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = "import sys; from tools.benchmark.worker import run_worker; run_worker(sys.argv[1], sys.argv[2])"
    cmd = [sys.executable, "-c", code, str(tmp_path / "spec.json"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["compiled"] and out["compile_seconds"] > 0 and out["seconds"] > 0
    assert out["compile_seconds_in_measured_steps"] <= out["compile_seconds"]
    assert out["samples"] > 3 * 8  # bigger batches than the fixed 8
    assert 0 < out["padding_fraction"] < 0.5 and len(out["losses"]) == 5


# --------------------------------------------------------------------------------------------- pieces


def _linear_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_forward_flops_match_the_real_flan_t5_base_layers(flan_t5_base_dir: Path) -> None:
    """One prompt token + one summary token touch every matmul weight once: 2 FLOPs per weight, plus attention."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(flan_t5_base_dir)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    dims = T5Dims.from_config(config)
    # attention with S = T = 1: encoder 2h per layer; decoder self 2h + cross 2h per layer
    attention = 2 * (dims.encoder_layers * 2 * dims.inner + dims.decoder_layers * 4 * dims.inner)
    assert forward_flops(dims, 1, 1) == 2 * _linear_weights(model) + attention
    # 247,577,856 parameters (untied lm_head) = Linear weights + embedding + 62 layer norms + 2 relative biases
    assert _linear_weights(model) == 247_577_856 - 32128 * 768 - 62 * 768 - 2 * 32 * 12
    assert training_flops(dims, [(230, 39)], "full") == 3 * forward_flops(dims, 230, 39)
    assert training_flops(dims, [(230, 39)], "lora") == 2 * forward_flops(dims, 230, 39)
    # the GPU check's per-token figure: the same FLOPs spread over the real tokens
    lengths = [(230, 39), (100, 20)]
    per_token = training_flops_per_token(dims, lengths, "full")
    assert per_token * (230 + 39 + 100 + 20) == pytest.approx(training_flops(dims, lengths, "full"))


def test_forward_flops_match_the_tiny_model(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir)
    dims = T5Dims.from_config(config)
    attention = 2 * (dims.encoder_layers * 2 * dims.inner + dims.decoder_layers * 4 * dims.inner)
    assert forward_flops(dims, 1, 1) == 2 * _linear_weights(model) + attention
    # quadratic attention terms grow with length
    assert forward_flops(dims, 200, 10) > 2 * forward_flops(dims, 100, 10)


def test_representative_batches_span_short_to_long() -> None:
    batches = [[i] for i in range(100)]
    tokens = list(range(100))
    picked = _representative_batches(batches, tokens, 4)
    assert picked == [[12], [37], [62], [87]]


def test_bad_flags_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--steps"):
        parse_args(["--model_dir", "m", "--data_file", "d", "--steps", "0"])
    with pytest.raises(ConfigError, match="--warmup_steps"):
        parse_args(["--model_dir", "m", "--data_file", "d", "--warmup_steps", "-1"])
    quick = parse_args(["--model_dir", "m", "--data_file", "d", "--quick"])
    assert (quick.steps, quick.eval_samples, quick.max_new_tokens) == (2, 16, 32)
    assert parse_args(["--model_dir", "m", "--data_file", "d"]).steps == 4


def test_missing_inputs_fail_fast_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    script = str(REPO / "scripts" / "benchmark.py")
    proc = run_script([sys.executable, script, "--model_dir", str(tmp_path), "--data_file", "x.jsonl"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --model_dir")
    proc = run_script([sys.executable, script, "--model_dir", str(tiny_model_dir), "--data_file", "x.jsonl"])
    assert proc.returncode == 1 and "--data_file not found" in proc.stderr
    proc = run_script([sys.executable, script, "--model_dir", str(tiny_model_dir), "--data_file", "x", "--steps", "0"])
    assert proc.returncode == 2 and "--steps must be > 0" in proc.stderr


def test_too_small_data_file_is_refused(tmp_path: Path, tiny_model_dir: Path, synthetic_data_dir: Path) -> None:
    from dialogsum.modeling import load_tokenizer
    from tools.benchmark.pool import build_pool

    rows = (synthetic_data_dir / "test.jsonl").read_text().splitlines()[:10]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(rows) + "\n")
    args = parse_args(["--model_dir", str(tiny_model_dir), "--data_file", str(small), "--steps", "4"])
    with pytest.raises(UserError, match="too few for 5 batches of 8"):
        build_pool(args, load_tokenizer(str(tiny_model_dir)))


# --------------------------------------------------------------------------------------------- precision

AVX512_BF16_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_tile\n"
M5_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("text", "expected"), [(AVX512_BF16_CPUINFO, "avx512_bf16"), (M5_CPUINFO, None), (GRAVITON3_CPUINFO, "bf16")]
)
def test_cpu_bf16_feature_reads_cpuinfo(tmp_path: Path, text: str, expected: str | None) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert cpu_bf16_feature(path) == expected
    assert cpu_bf16_feature(tmp_path / "absent") is None


def test_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIALOGSUM_CPU_BF16", raising=False)
    assert resolve_cpu_precision("bf16", native_bf16=True, speedup=1.8)[0] == "bf16"
    chosen, reason = resolve_cpu_precision("bf16", native_bf16=True, speedup=0.5)
    assert chosen == "no" and "measured only 0.50x fp32" in reason  # a native flag but slow bf16 kernels
    chosen, reason = resolve_cpu_precision("bf16", native_bf16=False)
    assert chosen == "no" and "no native bf16" in reason
    assert resolve_cpu_precision("no", native_bf16=True)[0] == "no"
    with pytest.raises(UserError, match="fp16"):
        resolve_cpu_precision("fp16", native_bf16=True)
    monkeypatch.setenv("DIALOGSUM_CPU_BF16", "force")
    assert resolve_cpu_precision("bf16", native_bf16=False)[0] == "bf16"
    monkeypatch.setenv("DIALOGSUM_CPU_BF16", "off")
    assert resolve_cpu_precision("bf16", native_bf16=True, speedup=1.8)[0] == "no"
    monkeypatch.setenv("DIALOGSUM_CPU_BF16", "maybe")
    with pytest.raises(UserError, match="DIALOGSUM_CPU_BF16"):
        resolve_cpu_precision("bf16", native_bf16=True)


@pytest.mark.parametrize(
    ("native", "override", "expected"),
    [(False, None, "no"), (True, None, "bf16"), (False, "force", "bf16"), (True, "off", "no")],
)
def test_build_accelerator_uses_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch, fresh_accelerate_state: None, native: bool, override: str | None, expected: str
) -> None:
    """A launcher config asking for bf16 (cpu.yaml) gets fp32 on a CPU without fast native bf16, with a log line."""
    import dialogsum.precision
    from dialogsum.distributed import build_accelerator

    monkeypatch.setattr(dialogsum.precision, "cpu_has_native_bf16", lambda: native)  # stands for the CPU model
    monkeypatch.setattr(dialogsum.precision, "bf16_matmul_speedup", lambda: 1.8)  # and for its bf16 kernels
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    if override is None:
        monkeypatch.delenv("DIALOGSUM_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("DIALOGSUM_CPU_BF16", override)
    accelerator = build_accelerator()
    assert accelerator.mixed_precision == expected
    if expected == "bf16":
        with accelerator.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_figures_keep_significant_digits_however_small() -> None:
    from dialogsum.formatting import significant

    assert significant(0.0412345) == 0.04123  # 3 fixed decimals would give 0.041 (0.6% off)
    assert significant(1234567.0) == 1235000.0 and significant(0.0) == 0.0
    assert significant(-2.71828, 3) == -2.72 and math.isnan(significant(float("nan")))
