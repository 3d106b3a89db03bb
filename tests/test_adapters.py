"""PEFT methods in-process on the tiny T5: every LoRA variant and IA3 counts its parameters as peft does, saves a
folder that merges (dialogsum.export) into the model that was trained, PiSSA/OLoRA adapters saved against the
original base (the same tensors as peft's own conversion), LoRA+ groups, and each refusal as one line."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_modeling import _flan_t5_base_on_meta

from dialogsum import adapters
from dialogsum.checkpointing import fingerprint, settings_differences
from dialogsum.config import IA3Arguments, LoraArguments, build_config, describe_method, parse_config
from dialogsum.errors import ConfigError, UserError
from dialogsum.export import merge_adapter
from dialogsum.modeling import apply_ia3, apply_lora, load_model, load_tokenizer, parameter_report, write_model_folder
from dialogsum.training import build_optimizer, build_scheduler

VARIANTS = {
    "lora": {},
    "dora+rslora": {"use_dora": True, "use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa_niter_2+rslora": {"init_lora_weights": "pissa_niter_2", "use_rslora": True},
    "olora": {"init_lora_weights": "olora"},
    "orthogonal": {"init_lora_weights": "orthogonal"},
    "all-linear": {"lora_target_modules": ["all-linear"]},
}


def _adapted(tiny_model_dir: Path, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir))
    if variant == "ia3":
        return apply_ia3(model, IA3Arguments())
    args = LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q", "v"])
    for key, value in VARIANTS[variant].items():
        setattr(args, key, value)
    return apply_lora(model, args)


def _as_if_trained(model: torch.nn.Module) -> None:
    """Move every trainable tensor away from its initial value (B = 0 would hide a wrong conversion)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randint(3, 90, (2, 11), generator=generator)
    labels = torch.randint(3, 90, (2, 6), generator=generator)
    with torch.no_grad():
        return model(input_ids=inputs, labels=labels).logits


@pytest.mark.parametrize("variant", [*VARIANTS, "ia3"])
def test_variant_counts_like_peft_saves_and_merges_into_the_trained_model(
    variant: str, tiny_model_dir: Path, tmp_path: Path, one_thread
) -> None:
    model = _adapted(tiny_model_dir, variant)
    report = parameter_report(model)
    assert (report["trainable_params"], report["total_params"]) == model.get_nb_trainable_parameters()
    _as_if_trained(model)
    model.eval()
    expected = _logits(model)
    write_model_folder(model, load_tokenizer(str(tiny_model_dir)), tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if variant != "ia3":  # a trained adapter: loads on peft versions that lack its initialisation (peft 0.13)
        assert saved["init_lora_weights"] is True
    if variant in ("pissa", "pissa_niter_2+rslora", "olora"):  # converted: rank 2r against the original base
        assert saved["r"] == 8
        assert saved["lora_alpha"] == pytest.approx(8 * 2**0.5 if "rslora" in variant else 16)
    merged, _ = merge_adapter(tmp_path / "adapter", str(tiny_model_dir))  # scripts/export.py's merge
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_saved_as_peft_converts_them(init: str, tiny_model_dir: Path, tmp_path: Path, one_thread) -> None:
    """peft's own path_initial_model_for_weight_conversion (initial adapter saved first, then the trained one
    converted against it) writes the same tensors and rank/alpha as dialogsum's conversion."""
    model = _adapted(tiny_model_dir, init)
    config = model.peft_config["default"]
    config.init_lora_weights = True  # peft's documented recipe: the initial adapter is saved as plain LoRA
    model.save_pretrained(str(tmp_path / "initial"))
    config.init_lora_weights = init
    _as_if_trained(model)
    model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    write_model_folder(model, load_tokenizer(str(tiny_model_dir)), tmp_path / "ours")
    theirs, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    a, b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    assert (a["r"], a["lora_alpha"], a["init_lora_weights"]) == (b["r"], b["lora_alpha"], b["init_lora_weights"])
    assert model.peft_config["default"].r == 4  # the model in training keeps its own settings


def test_flan_t5_base_trainable_parameters_of_each_method() -> None:
    """The figures of docs/training.md, on flan-t5-base's shapes (meta device), as peft counts them."""
    expected = {
        "lora": (LoraArguments(), 3_538_944),
        "dora": (LoraArguments(use_dora=True), 3_594_240),  # + one magnitude per output feature of q and v
        "all-linear": (LoraArguments(lora_target_modules=["all-linear"]), 13_565_952),
        "preset": (LoraArguments(lora_target_modules="q k v o wi_0 wi_1 wo".split()), 13_565_952),
    }
    for name, (args, count) in expected.items():
        model = apply_lora(_flan_t5_base_on_meta(), args)
        assert parameter_report(model)["trainable_params"] == model.get_nb_trainable_parameters()[0] == count, name
    model = apply_ia3(_flan_t5_base_on_meta(), IA3Arguments())
    # k, v: 768 per attention (12 encoder + 24 decoder); wo: 2048 (its input) per feed-forward (24)
    assert parameter_report(model)["trainable_params"] == model.get_nb_trainable_parameters()[0] == 104_448


def test_loraplus_groups_learn_b_faster(tiny_model_dir: Path) -> None:
    cfg = build_config("lora", {"learning_rate": 1e-3, "loraplus_lr_ratio": 16.0, "lora_target_modules": ["q", "v"]})
    model = _adapted(tiny_model_dir, "lora")
    optimizer = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {names[id(p)].split(".")[-3]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates == {"lora_A": 1e-3, "lora_B": 16e-3}
    assert all(g["params"] for g in optimizer.param_groups)  # no empty group (DeepSpeed refuses them)
    scheduler = build_scheduler(optimizer, cfg, total_steps=4)
    optimizer.step()
    scheduler.step()
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.75e-3, 12e-3])  # linear decay


def test_method_settings_in_the_resume_fingerprint() -> None:
    plain = build_config("lora", {"output_dir": "x"})
    dora = build_config("lora", {"output_dir": "x", "use_dora": True, "loraplus_lr_ratio": 4.0})
    assert settings_differences(fingerprint(dora), plain) == [
        "use_dora: checkpoint True vs now False",
        "loraplus_lr_ratio: checkpoint 4.0 vs now None",
    ]
    older = {k: v for k, v in fingerprint(plain).items() if k not in ("use_dora", "init_lora_weights")}
    assert settings_differences(older, plain) == []  # a checkpoint from before these settings: their defaults
    ia3 = build_config("ia3", {"output_dir": "x", "ia3_target_modules": ["k", "v"], "ia3_feedforward_modules": []})
    assert "ia3_target_modules: checkpoint ['k', 'v'] vs now ['k', 'v', 'wo']" in settings_differences(
        fingerprint(ia3), build_config("ia3", {"output_dir": "x"})
    )


@pytest.mark.parametrize(
    ("method", "argv", "message"),
    [
        ("lora", ["--use_dora", "--init_lora_weights", "pissa"], "--use_dora with --init_lora_weights pissa: a pissa"),
        ("lora", ["--init_lora_weights", "eva"], "--init_lora_weights eva needs a pass over training activations"),
        ("lora", ["--init_lora_weights", "loftq"], "--init_lora_weights loftq needs a quantized base model"),
        ("lora", ["--init_lora_weights", "svd"], "--init_lora_weights must be one of true, false, gaussian, pissa"),
        ("lora", ["--init_lora_weights", "pissa_niter_99999999999"], "N goes from 0 to 1000 subspace iterations"),
        ("lora", ["--init_lora_weights", "pissa_niter_\u0663"], "--init_lora_weights must be one of"),  # not 0-9
        ("lora", ["--init_lora_weights", "orthogonal", "--lora_r", "5"], "orthogonal needs an even --lora_r, got 5"),
        ("lora", ["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be > 0"),
        ("lora", ["--lora_target_modules", "all-linear", "q"], "all-linear already takes every linear layer"),
        ("full", ["--use_dora"], "--use_dora is a LoRA setting: use it with scripts/train_lora.py"),
        ("ia3", ["--loraplus_lr_ratio", "16"], "--loraplus_lr_ratio is a LoRA setting"),
        ("full", ["--merge_lora"], "--merge_lora merges an adapter: use it with scripts/train_lora.py or train_ia3"),
        ("ia3", ["--ia3_feedforward_modules", "wi_0"], "--ia3_feedforward_modules wi_0 must also be in"),
    ],
)
def test_flags_peft_cannot_apply_are_one_config_error(method: str, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(["--output_dir", "x", *argv], method)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_initialisation_newer_than_the_installed_peft_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig

    field = LoraConfig.__dataclass_fields__["init_lora_weights"]
    # what peft 0.13 (pyproject.toml's floor) declares
    monkeypatch.setattr(field, "type", "bool | Literal['gaussian', 'olora', 'pissa', 'pissa_niter_[number of iters]']")
    adapters.check_adapter(build_config("lora", {"init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(UserError, match=r"orthogonal needs a newer peft than the installed .* \(it offers true, false, "
                       r"gaussian, pissa, pissa_niter_N, olora\)"):  # fmt: skip
        adapters.check_adapter(build_config("lora", {"init_lora_weights": "orthogonal"}))


def test_sharded_loading_refuses_initialisations_that_read_whole_weights() -> None:
    sharded = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero3_init_flag=True)))
    whole = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero3_init_flag=False)))
    for values in ({"use_dora": True}, {"init_lora_weights": "olora"}):
        cfg = build_config("lora", values)
        adapters.check_topology(cfg, whole)
        with pytest.raises(UserError, match="set zero3_init_flag: false"):
            adapters.check_topology(cfg, sharded)
    adapters.check_topology(build_config("lora", {"use_rslora": True}), sharded)


def test_method_descriptions() -> None:
    lora = build_config("lora", {"use_dora": True, "use_rslora": True, "init_lora_weights": "gaussian",
                                 "loraplus_lr_ratio": 16.0})  # fmt: skip
    assert describe_method(lora.to_dict()) == "LoRA r=32 alpha=32 q,v DoRA rsLoRA init=gaussian LoRA+x16"
    assert describe_method(build_config("ia3", {}).to_dict()) == "IA3 k,v,wo (feed-forward wo)"
    assert describe_method(build_config("full", {}).to_dict()) == "full"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


#: variant -> (training script, flags): each trains, resumes bit for bit and reloads (PiSSA's test below also
#: reloads its converted adapter on the original base; the merged export of each: the test above)
RESUMED_VARIANTS = {
    "pissa_niter_2": ("lora", ["--lora_target_modules", "q", "k", "v", "o", "--init_lora_weights", "pissa_niter_2"]),
    "gaussian": ("lora", ["--init_lora_weights", "gaussian"]),
    "olora+rslora": ("lora", ["--init_lora_weights", "olora", "--use_rslora"]),
    "orthogonal": ("lora", ["--init_lora_weights", "orthogonal"]),
    "all-linear+loraplus": ("lora", ["--lora_target_modules", "all-linear", "--loraplus_lr_ratio", "4"]),
    "ia3": ("ia3", []),
}


def _common_flags(model_dir: Path, data_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--train_file", str(data_dir / "train.jsonl"),
        "--test_file", str(data_dir / "test.jsonl"), "--max_train_samples", "48", "--max_test_samples", "12",
        "--per_device_train_batch_size", "8", "--max_train_steps", "6", "--checkpointing_steps", "3",
        "--learning_rate", "1e-2", "--max_source_length", "96", "--max_target_length", "32", "--max_new_tokens", "24",
        "--report_to", "none",
    ]  # fmt: skip


def _train_and_resume(variant: str, assets: tuple[Path, Path], root: Path) -> tuple[dict, Path, Path]:
    """A real train_<method>.py run (in-process) of ``variant``, and its resume from checkpoint-3 into a new output
    folder. Returns (the run's metrics, its folder, the resumed run's folder)."""
    from helpers import script_main

    method, flags = RESUMED_VARIANTS[variant]
    common = [*_common_flags(*assets), *(["--lora_r", "4"] if method == "lora" else []), *flags]
    train = script_main(f"train_{method}")
    run, resumed = root / "run", root / "resumed"
    metrics = train([*common, "--output_dir", str(run)])
    _reset_accelerate()
    train([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(run / "checkpoint-3"),
           "--do_eval", "false"])  # fmt: skip
    _reset_accelerate()
    return metrics, run, resumed


@pytest.fixture(scope="module")
def variant_runs(
    tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]
) -> dict[str, tuple[dict, Path, Path]]:
    """Every variant of :data:`RESUMED_VARIANTS` trained and resumed (one thread, accelerate state reset around)."""
    root = tmp_path_factory.mktemp("variants")
    threads = torch.get_num_threads()
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # also tells build_accelerator the count was chosen
        torch.set_num_threads(1)
        try:
            _reset_accelerate()
            for variant in RESUMED_VARIANTS:
                runs[variant] = _train_and_resume(variant, quickstart_assets, root / variant)
        finally:
            torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("variant", list(RESUMED_VARIANTS))
def test_variant_trains_resumes_exactly_and_is_described(
    variant: str, variant_runs: dict[str, tuple[dict, Path, Path]]
) -> None:
    """Resumed from checkpoint-3 of a 6-step run, every variant ends bit for bit where the run did; its saved
    adapter is non-empty, counts what peft counts, and the run's metrics name the variant (the comparison's
    "method" column)."""
    metrics, run, resumed = variant_runs[variant]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (run, resumed))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), variant
    assert all(t.numel() > 0 for t in a.values())
    # it resumed at step 3 (no checkpoint-3 of its own) and trained on from there
    assert not (resumed / "checkpoint-3").exists() and (resumed / "checkpoint-6").is_dir()
    at_3 = load_file(str(run / "checkpoint-3" / "adapter_model.safetensors"))
    assert any(not torch.equal(at_3[k], a[k]) for k in a)
    state = json.loads((resumed / "metrics.json").read_text())
    assert state["train_steps"] == 6 and state["train_loss"] == metrics["train_loss"]
    expected = {
        "pissa_niter_2": "LoRA r=4 alpha=32 q,k,v,o init=pissa_niter_2",
        "gaussian": "LoRA r=4 alpha=32 q,v init=gaussian",
        "olora+rslora": "LoRA r=4 alpha=32 q,v rsLoRA init=olora",
        "orthogonal": "LoRA r=4 alpha=32 q,v init=orthogonal",
        "all-linear+loraplus": "LoRA r=4 alpha=32 all-linear LoRA+x4",
        "ia3": "IA3 k,v,wo (feed-forward wo)",
    }[variant]
    assert metrics["method_detail"] == expected
    converted = variant in ("pissa_niter_2", "olora+rslora")  # saved as plain rank-2r LoRA against the base
    assert sum(t.numel() for t in a.values()) == metrics["trainable_params"] * (2 if converted else 1)
    if converted:
        for folder in (run, run / "checkpoint-3"):  # every loadable adapter folder
            config = json.loads((folder / "adapter_config.json").read_text())
            assert (config["r"], config["init_lora_weights"]) == (8, True)
            assert config["lora_alpha"] == pytest.approx(32 * 2**0.5 if "rslora" in variant else 64)


def test_every_variant_is_a_row_of_the_comparison(variant_runs: dict[str, tuple[dict, Path, Path]], tmp_path: Path):
    """compare.py over the variants' runs: one row each, named by its method, with its trainable parameters."""
    from helpers import script_main

    runs = [f"{variant}={folder}" for variant, (_, folder, _) in variant_runs.items()]
    script_main("compare")([*(a for run in runs for a in ("--run", run)), "--output_dir", str(tmp_path),
                            "--n_resamples", "10"])  # fmt: skip
    table = (tmp_path / "comparison.md").read_text()
    for variant, (metrics, _, _) in variant_runs.items():
        assert f"| {variant} | {metrics['method_detail']} |" in table
        assert f"{metrics['trainable_params']:,}" in table


def test_pissa_adapter_reloads_on_the_original_base_with_the_run_predictions(
    tmp_path: Path, quickstart_assets: tuple[Path, Path], fresh_accelerate_state, one_thread
) -> None:
    """PiSSA changes the base weights at creation; the saved adapter is plain LoRA against the original base
    model, so evaluate.py with the untouched base generates exactly the run's predictions."""
    from helpers import script_main

    model_dir, data_dir = quickstart_assets
    method, flags = RESUMED_VARIANTS["pissa_niter_2"]
    run = tmp_path / "run"
    script_main("train_lora")([*_common_flags(model_dir, data_dir), "--lora_r", "4", *flags, "--output_dir", str(run),
                               "--max_train_steps", "3"])  # fmt: skip
    predictions = [json.loads(x)["prediction"] for x in (run / "predictions.jsonl").read_text().splitlines()]
    _reset_accelerate()
    script_main("evaluate")(
        ["--model_name_or_path", str(model_dir), "--adapter_path", str(run), "--max_test_samples", "12",
         "--test_file", str(data_dir / "test.jsonl"), "--max_new_tokens", "24", "--output_dir", str(tmp_path / "eval"),
         "--report_to", "none"]
    )  # fmt: skip
    got = [json.loads(x)["prediction"] for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert got == predictions


def test_the_ia3_recipe_differs_from_the_lora_recipe_only_in_the_method() -> None:
    from helpers import REPO

    def code(name: str) -> list[str]:
        text = (REPO / "scripts" / f"train_{name}.py").read_text()
        return text[text.index('"""', 3) + 3 :].splitlines()  # after the module docstring

    diff = difflib.unified_diff(code("lora"), code("ia3"), n=0, lineterm="")
    changed = [line[0] + line[1:].strip() for line in diff if line[:1] in "+-" and line[:3] not in ("---", "+++")]
    checkpointing = "gradient_checkpointing=cfg.model.gradient_checkpointing)"
    assert changed == [
        '-cfg = parse_config(argv, method="lora", description=__doc__ or "")',
        '+cfg = parse_config(argv, method="ia3", description=__doc__ or "")',
        f"-model = modeling.apply_lora(model, cfg.lora, {checkpointing}",
        f"+model = modeling.apply_ia3(model, cfg.ia3, {checkpointing}",
    ]
