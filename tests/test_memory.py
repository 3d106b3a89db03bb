"""The memory estimate (dialogsum/memory.py): exact parameter counts, DeepSpeed's own model-state estimators, the
script's output and refusals. Measured peaks are a documented command (docs/benchmarks.md), not a test."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from helpers import REPO, run_script, script_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialogsum import memory
from dialogsum.errors import UserError


def test_parameter_counts_are_the_architectures(flan_t5_base_dir) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    dims = memory.resolve_dims(str(flan_t5_base_dir))
    assert dims == memory.PRESETS["flan-t5-base"]
    assert memory.count_parameters(dims) == 247_577_856
    assert memory.lora_parameters(dims, 32, ["q", "v"]) == 3_538_944
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(str(flan_t5_base_dir)))
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # lm_head tied here (transformers 5)
        lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]))
        trainable, _ = lora.get_nb_trainable_parameters()
    assert sum(math.prod(s) for s in shapes.values()) + dims.vocab_size * dims.d_model == 247_577_856
    assert sorted(s for _, s in memory.parameter_shapes(dims) if _ != "lm_head") == sorted(shapes.values())
    assert memory.lora_parameters(dims, 8, ["all-linear"]) == trainable
    assert memory.largest_layer(dims) == 32128 * 768
    large = memory.PRESETS["flan-t5-large"]
    assert memory.count_parameters(large) == 783_150_080


def test_adafactor_state_matches_transformers_adafactor(tiny_model_dir) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from dialogsum.config import build_config
    from dialogsum.training import build_optimizer

    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))
    optimizer = build_optimizer(model, build_config("full", {"optim": "adafactor", "output_dir": "x"}))
    model(input_ids=torch.tensor([[5, 6, 1]]), labels=torch.tensor([[7, 1]])).loss.backward()
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    assert memory.adafactor_state_bytes([tuple(p.shape) for p in model.parameters()]) == state


@pytest.mark.parametrize("gpus", [1, 8])
def test_model_states_match_deepspeeds_estimators(gpus: int, capsys: pytest.CaptureFixture) -> None:
    """Full fine-tuning with AdamW in bf16: per GPU and per host exactly DeepSpeed's figures (which assume
    Adam, 16-bit weights and no zero.Init, as the shipped configs)."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    for name in ("flan-t5-large", "flan-t5-xl"):
        setup = memory.Setup(dims=memory.PRESETS[name], num_gpus=gpus)
        total, largest = setup.total, memory.largest_layer(setup.dims)

        def ours(strategy: str, setup: memory.Setup = setup) -> tuple[int, int]:
            gpu, host = memory.model_state_bytes(setup, strategy)
            return sum(host.values()), sum(gpu.values())

        zero2 = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=False)
        zero3 = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, cpu_offload=False, zero_init=False)
        offload = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, True, True, zero_init=False)
        assert ours("zero2") == pytest.approx(zero2, abs=2)
        assert ours("zero3") == pytest.approx(zero3[:2], abs=2)
        assert ours("zero3_offload") == pytest.approx(offload[:2], abs=2)
        # the printed tables say the same (GB = GiB there, two decimals)
        estimate_zero2_model_states_mem_needs_all_cold(total, gpus, 1)
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, gpus, 1)
        printed = capsys.readouterr().out
        for cpu, gpu in (zero2, zero3[:2], offload[:2]):
            assert f"{cpu / 2**30:7.2f}GB | {gpu / 2**30:6.2f}GB" in printed


def test_lora_and_adafactor_shrink_the_states() -> None:
    dims = memory.PRESETS["flan-t5-base"]
    full = memory.model_state_bytes(memory.Setup(dims=dims), "ddp")[0]
    lora = memory.model_state_bytes(memory.Setup(dims=dims, method="lora"), "ddp")[0]
    ada = memory.model_state_bytes(memory.Setup(dims=dims, optim="adafactor"), "ddp")[0]
    assert full["optimizer"] == 8 * 247_577_856 and lora["optimizer"] == 8 * 3_538_944
    assert ada["optimizer"] < full["optimizer"] / 100  # factored second moments, no momentum
    assert lora["gradients"] == 4 * 3_538_944


def test_script_names_the_config_that_fits_and_refuses_bad_input(tmp_path) -> None:
    script = str(REPO / "scripts" / "estimate_memory.py")
    proc = run_script(["python", script, "--model", "flan-t5-xl", "--num_gpus", "8", "--gpu_memory_gb", "40"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2,849,757,184 parameters" in proc.stdout
    fits = [x for x in proc.stdout.splitlines() if x.startswith("fits 40 GB per GPU")]
    assert len(fits) == 1 and "--num_processes 8" in fits[0] and "deepspeed_zero" in fits[0], proc.stdout
    proc = run_script(["python", script, "--model", "flan-t5-base", "--json"])
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["parameters"] == 247_577_856 and set(result["strategies"]) == set(memory.STRATEGIES)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    xxl = tmp_path / "xxl"
    xxl.mkdir()
    sizes = {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24, "vocab_size": 32128}
    (xxl / "config.json").write_text(json.dumps({"model_type": "t5", **sizes, "feed_forward_proj": "gated-gelu"}))
    for args, message in (
        (["--model", "flan-t5-huge"], "error: --model flan-t5-huge: not one of flan-t5-small"),
        (["--model", str(tmp_path)], "is not a T5"),
        (["--batch", "0"], "error: --batch must be from 1 to 2**31 - 1, got 0"),
        (["--measure"], "error: --measure builds the model from a folder's config.json; --model flan-t5-base is"),
        (["--model", str(xxl), "--measure"], "error: --measure needs about 249.98 GiB and this machine has"),
    ):
        proc = run_script(["python", script, *args])
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_activation_count_matches_what_autograd_keeps(one_thread: None) -> None:
    """fp32 on the CPU, dropout on: the estimate's bytes per encoder and per decoder layer are what autograd's
    saved tensors hold (counted by storage, weights left out), within 1%, on a small T5 built from its config."""
    from transformers import T5Config, T5ForConditionalGeneration

    from dialogsum.fast_layers import use_fast_layers

    dims = memory.T5Dims(d_model=64, d_ff=96, num_heads=4, num_layers=1, num_decoder_layers=1, d_kv=16, vocab_size=512)

    def saved(encoder_layers: int, decoder_layers: int) -> int:
        torch.manual_seed(0)
        config = T5Config(
            d_model=64, d_ff=96, num_heads=4, d_kv=16, num_layers=encoder_layers, vocab_size=512,
            num_decoder_layers=decoder_layers, feed_forward_proj="gated-gelu", dropout_rate=0.1,
            decoder_start_token_id=0,
        )  # fmt: skip
        model = use_fast_layers(T5ForConditionalGeneration(config)).train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept.setdefault(storage.data_ptr(), storage.nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=torch.randint(2, 512, (2, 24)), labels=torch.randint(2, 512, (2, 8)))
        return sum(kept.values())

    def estimated(encoder_layers: int, decoder_layers: int) -> int:
        layers = memory.T5Dims(**{**dims.__dict__, "num_layers": encoder_layers, "num_decoder_layers": decoder_layers})
        return memory.activation_bytes(layers, 2, 24, 8, precision="fp32", device="cpu")

    for grown in ((2, 1), (1, 2)):  # one more encoder layer, one more decoder layer
        counted = saved(*grown) - saved(1, 1)
        assert estimated(*grown) - estimated(1, 1) == pytest.approx(counted, rel=0.01)


def test_zero3_buffers_follow_deepspeeds_defaults_which_the_configs_keep() -> None:
    """The gathered parameters and the reduce bucket are sized by DeepSpeed's defaults; the shipped configs do not
    override them (if one did, the estimate would be wrong), and a CPU run's host column holds its processes."""
    import yaml
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    defaults = DeepSpeedZeroConfig()
    assert memory.REDUCE_BUCKET_ELEMENTS == defaults.reduce_bucket_size
    assert memory.STAGE3_MAX_LIVE_PARAMETERS == defaults.max_live_parameters <= defaults.max_reuse_distance
    for path in sorted((REPO / "accelerate_configs").glob("deepspeed_*.yaml")):
        keys = set(yaml.safe_load(path.read_text())["deepspeed_config"])
        assert not keys & {"reduce_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"}, path

    large = memory.PRESETS["flan-t5-large"]
    bf16 = {e.strategy: e for e in memory.estimate(memory.Setup(dims=large, num_gpus=2))}
    assert bf16["zero3"].gpu["ZeRO-3 buffers"] == 2 * (783_150_080 + 500_000_000)
    assert bf16["zero2"].gpu["ZeRO-3 buffers"] == 0
    xl = memory.estimate(memory.Setup(dims=memory.PRESETS["flan-t5-xl"]))[2]  # more than 1e9: capped
    assert xl.gpu["ZeRO-3 buffers"] == 2 * (10**9 + 500_000_000)
    cpu = memory.Setup(dims=large, num_gpus=2, precision="fp32", device="cpu")
    for e in memory.estimate(cpu):  # the model each process loads is the weights it trains: counted once
        assert e.host["processes' own memory (CPU)"] == 2 * e.gpu_bytes
        assert e.host_bytes == 2 * e.gpu_bytes + e.host.get("offloaded states", 0)
    # fp32: DeepSpeed clones an fp32 master partition for ZeRO-2 and the offloaded optimizer, not for ZeRO-3 on the GPU
    half = 783_150_080 // 2
    per_partition = {s: memory.model_state_bytes(cpu, s)[0]["optimizer"] // half for s in ("zero2", "zero3")}
    assert per_partition == {"zero2": 12, "zero3": 8}  # master + moments; moments only
    offloaded = memory.model_state_bytes(cpu, "zero3_offload")[1]["offloaded states"]
    # weights, gradients (the partition's and the fp32 master's), master, moments: 24 bytes, as counted (benchmarks.md)
    assert offloaded == int((4 + 8 + 4 + 8) * 783_150_080 * memory.HOST_BUFFER_FACTOR)


SIZE_KEYS = ("d_model", "d_ff", "num_heads", "num_layers", "num_decoder_layers", "d_kv", "vocab_size")


def _json_values() -> Any:
    scalars = st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=False) | st.text(max_size=5)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(), inner))


def _estimate_or_refusal(argv: list[str]) -> dict | None:
    """scripts/estimate_memory.py's main in this process: its result, or None when it refused with a UserError
    of one line (anything else escapes and fails the test)."""
    try:
        return script_main("estimate_memory")(argv)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc), exc
        return None


def test_any_model_config_gives_an_estimate_or_one_line(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated config.json files (T5 sizes of any JSON value, any extra keys): an estimate with the exact
    parameter count of the sizes, or one UserError line; never a traceback."""
    folder = tmp_path_factory.mktemp("generated_config")
    sizes = st.integers(1, 64) | _json_values()
    configs = st.fixed_dictionaries(
        {"model_type": st.sampled_from(["t5", "mt5", "bart"]) | _json_values()},
        optional={k: sizes for k in (*SIZE_KEYS, "dropout_rate", "feed_forward_proj")},
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(config=configs)
    def check(config: dict) -> None:
        (folder / "config.json").write_text(json.dumps(config))
        result = _estimate_or_refusal(["--model", str(folder), "--json", "--batch", "1", "--source_len", "4",
                                       "--target_len", "2"])  # fmt: skip
        if result is not None:
            dims = memory.resolve_dims(str(folder))
            assert result["parameters"] == memory.count_parameters(dims) > 0

    check()


def _valid(values: dict[str, str], names: list[str]) -> bool:
    """Whether the generated flags are what the estimate accepts: whole numbers from 1 to 2**31 - 1, a positive
    finite GPU size, GPUs a multiple of hosts, T5 Linear names (all-linear alone)."""
    if set(names) - {*memory.ALL_LINEAR, "wi", "all-linear"} or ("all-linear" in names and len(names) > 1):
        return False
    numbers = {"--num_gpus": 1, "--num_nodes": 1}
    for flag, text in values.items():
        try:
            value = float(text) if flag == "--gpu_memory_gb" else int(text)
        except ValueError:
            return False
        if not (0 < value < math.inf if flag == "--gpu_memory_gb" else 0 < value < 2**31):
            return False
        numbers[flag] = value
    return numbers["--num_gpus"] % numbers["--num_nodes"] == 0


def test_any_numeric_flags_give_an_estimate_or_one_line() -> None:
    """Generated values of every numeric flag and LoRA target lists: an estimate exactly when they are valid,
    else one UserError line (or argparse's usage error for a non-number); never a traceback."""
    numbers = st.integers(-2, 2**64).map(str) | st.floats().map(str) | st.sampled_from(["1e999", "x", "", "3"])
    flags = ("--num_gpus", "--num_nodes", "--batch", "--source_len", "--target_len", "--lora_r", "--gpu_memory_gb")
    targets = st.lists(st.sampled_from(["q", "v", "wo", "wi", "all-linear", "zz", "Q"]), min_size=1, max_size=3)

    @settings(max_examples=80, deadline=None)
    @given(values=st.dictionaries(st.sampled_from(flags), numbers, max_size=4), names=targets)
    def check(values: dict[str, str], names: list[str]) -> None:
        argv = ["--model", "flan-t5-small", "--method", "lora", "--json", "--lora_target_modules", *names]
        try:
            result = _estimate_or_refusal([*argv, *(x for kv in values.items() for x in kv)])
        except SystemExit as exc:  # argparse's own refusal of a non-number: exit 2 with its usage line
            assert exc.code == 2 and not _valid(values, names)
            return
        assert (result is not None) == _valid(values, names), (values, names)
        if result is not None:
            assert all(s["gpu_bytes"] > 0 for s in result["strategies"].values())

    check()


def test_zero3_offload_warns_before_loading_when_the_states_exceed_this_host(tmp_path, caplog) -> None:
    """An XXL-sized config under an offloading ZeRO-3 config: the warning names what DeepSpeed's estimate says the
    host needs (this machine's real available memory is far below 280 GiB); a model that fits, or no offload, says
    nothing."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dialogsum import steps
    from dialogsum.config import build_config

    xxl = tmp_path / "xxl"
    xxl.mkdir()
    sizes = {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24, "vocab_size": 32128}
    (xxl / "config.json").write_text(json.dumps({"model_type": "t5", **sizes, "feed_forward_proj": "gated-gelu"}))

    def accelerator(offload: str) -> SimpleNamespace:
        zero = {"stage": 3, "offload_optimizer": {"device": offload}}
        plugin = SimpleNamespace(zero_stage=3, deepspeed_config={"zero_optimization": zero})
        state = SimpleNamespace(deepspeed_plugin=plugin)
        return SimpleNamespace(state=state, distributed_type=DistributedType.DEEPSPEED, is_local_main_process=True,
                               num_processes=1, mixed_precision="bf16")  # fmt: skip

    def warnings(model: str, offload: str) -> list[str]:
        caplog.clear()
        cfg = build_config("full", {"output_dir": "x", "model_name_or_path": model})
        with caplog.at_level("WARNING", logger="dialogsum.steps"):
            steps.warn_offload_memory(cfg, accelerator(offload))
        return [r.getMessage() for r in caplog.records]

    (message,) = warnings(str(xxl), "cpu")
    least = 18 * 11_135_332_352  # bf16: weights 2, gradients 4, master 4, moments 8 bytes
    about, at_least = memory.gib(int(least * 1.5)), memory.gib(least)
    assert message.startswith(f"ZeRO-3 offload keeps about {about} of model states in this host's memory")
    assert f"buffer factor; at least {at_least}) and " in message
    assert "expect the run to be killed for memory in its first step" in message
    assert warnings(str(xxl), "none") == [] and warnings("google/flan-t5-small", "cpu") == []
