"""Every shipped accelerate config parses, passes `accelerate launch`'s own validation, and sets what it says.

No process is launched here: the configs go through accelerate's config loader, the `launch` argument parser
and validation, and the functions that build the child processes' environment. DeepSpeed configs are then
turned into the DeepSpeed config the child would run with, to check stages and offload for real.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType
from accelerate.utils.launch import (
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
    prepare_simple_launcher_cmd_env,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"

#: file -> (distributed type, mixed precision, processes)
EXPECTED = {
    "cpu.yaml": ("NO", "bf16", 1),  # bf16 only where native: build_accelerator falls back to fp32 otherwise
    "multi_cpu.yaml": ("MULTI_GPU", "no", 2),
    "single_gpu.yaml": ("NO", "bf16", 1),
    "multi_gpu.yaml": ("MULTI_GPU", "bf16", 2),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "bf16", 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "bf16", 1),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", "bf16", 1),
    "fsdp.yaml": ("FSDP", "bf16", 2),
    "multi_node.yaml": ("MULTI_GPU", "bf16", 16),
}
LOCAL_CONFIGS = sorted(EXPECTED)
#: Launcher configs for GPUs: they compile (regional torch.compile); the CPU ones stay eager.
GPU_CONFIGS = sorted(set(EXPECTED) - {"cpu.yaml", "multi_cpu.yaml"})


def test_the_shipped_set_is_complete() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted([*EXPECTED, "sagemaker.yaml"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_config_parses_and_is_commented(name: str) -> None:
    path = CONFIG_DIR / name
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and "distributed_type" in raw
    assert sum(line.lstrip().startswith("#") for line in path.read_text().splitlines()) >= 2, "a few comments"
    config = load_config_from_file(str(path))
    # T5 overflows in fp16: no config may select it.
    assert config.mixed_precision in ("no", "bf16")


@pytest.mark.parametrize("name", LOCAL_CONFIGS)
def test_local_config_values(name: str) -> None:
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    dist, precision, processes = EXPECTED[name]
    assert config.distributed_type == DistributedType(dist)
    assert config.mixed_precision == precision
    assert config.num_processes == processes
    assert config.use_cpu == (name in ("cpu.yaml", "multi_cpu.yaml"))


def _launch_env(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, dict[str, str]]:
    """What `accelerate launch --config_file <name> script.py` would validate and export to its children."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIG_DIR / name), "train.py", "--quickstart"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


@pytest.mark.parametrize("name", LOCAL_CONFIGS)
def test_accepted_by_accelerate_launch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args, env = _launch_env(name, monkeypatch)
    assert args.num_processes == EXPECTED[name][2]
    assert env["ACCELERATE_MIXED_PRECISION"] == EXPECTED[name][1]


def test_cpu_config_gives_the_process_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    _, env = _launch_env("cpu.yaml", monkeypatch)
    assert env["ACCELERATE_USE_CPU"] == "True"
    assert int(env["OMP_NUM_THREADS"]) == max(psutil.cpu_count(logical=False) or 1, 1)


def test_multi_cpu_config_starts_two_torchrun_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    args, env = _launch_env("multi_cpu.yaml", monkeypatch)
    # MULTI_GPU goes through torchrun (really N processes); MULTI_CPU or --cpu would use the one-process launcher.
    assert args.multi_gpu and not args.cpu
    assert args.nproc_per_node == "2"
    assert args.use_cpu


def _deepspeed_plugin(name: str, monkeypatch: pytest.MonkeyPatch) -> DeepSpeedPlugin:
    _, env = _launch_env(name, monkeypatch)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin()


@pytest.mark.parametrize(
    ("name", "stage", "offload"),
    [
        ("deepspeed_zero2.yaml", 2, "none"),
        ("deepspeed_zero3.yaml", 3, "none"),
        ("deepspeed_zero3_offload.yaml", 3, "cpu"),
    ],
)
def test_deepspeed_configs(name: str, stage: int, offload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = _deepspeed_plugin(name, monkeypatch)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    # "offload" means both: optimizer states AND parameters.
    assert zero["offload_optimizer"]["device"] == offload
    assert zero["offload_param"]["device"] == offload
    # ZeRO-3 saves one consolidated model folder; clipping matches --max_grad_norm's default.
    assert zero["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0
    # zero3_init_flag would load FLAN-T5 with its separate lm_head tied to the embedding (transformers 5.x).
    assert plugin.zero3_init_flag is False
    # Accumulation must come from --gradient_accumulation_steps, not from the launcher config.
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in os.environ


def test_fsdp_wraps_t5_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.t5 import modeling_t5

    _, env = _launch_env("fsdp.yaml", monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "T5Block"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert hasattr(modeling_t5, "T5Block")


def test_multi_node_template(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config_from_file(str(CONFIG_DIR / "multi_node.yaml"))
    assert config.num_machines == 2 and config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port
    text = (CONFIG_DIR / "multi_node.yaml").read_text()
    assert "--machine_rank 1" in text, "the template shows how to start the other machines"


def test_sagemaker_config() -> None:
    config = load_config_from_file(str(CONFIG_DIR / "sagemaker.yaml"))
    assert isinstance(config, SageMakerConfig)
    assert config.ec2_instance_type.startswith("ml.")
    assert config.mixed_precision == "bf16"


def _request(name: str, *flags: str):
    from dialogsum.distributed import launch_request_from_argv

    request = launch_request_from_argv(["--config_file", str(CONFIG_DIR / name), *flags, "train.py"], {})
    assert request is not None
    return request


@pytest.mark.parametrize("name", LOCAL_CONFIGS)
def test_gpu_configs_compile_regionally_and_cpu_configs_stay_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the child process gets: ACCELERATE_DYNAMO_* from the launcher, or (DeepSpeed, whose launcher drops
    dynamo_config) the plugin build_accelerator passes on from the config file."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    from dialogsum.distributed import dynamo_plugin_from

    args, env = _launch_env(name, monkeypatch)
    passed_on = dynamo_plugin_from(_request(name).dynamo)
    if name not in GPU_CONFIGS:
        assert env["ACCELERATE_DYNAMO_BACKEND"] == "NO" and passed_on is None
        return
    assert passed_on is not None and passed_on.backend == DynamoBackend.INDUCTOR
    assert passed_on.use_regional_compilation and passed_on.dynamic is True and not passed_on.fullgraph
    if args.use_deepspeed:
        assert "ACCELERATE_DYNAMO_BACKEND" not in env  # accelerate's gap that build_accelerator closes
        return
    for key in [k for k in os.environ if k.startswith("ACCELERATE_DYNAMO_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("ACCELERATE_DYNAMO_"):
            monkeypatch.setenv(key, value)
    plugin = TorchDynamoPlugin()  # as the Accelerator of the child process builds it
    assert plugin.backend == DynamoBackend.INDUCTOR and plugin.use_regional_compilation
    assert plugin.dynamic is True, "without dynamic shapes new batch shapes recompile up to torch's limit"
    assert plugin.mode == "default"


@pytest.mark.parametrize("name", ["single_gpu.yaml", "deepspeed_zero2.yaml"])
def test_eager_is_one_flag_away(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dialogsum.distributed import dynamo_plugin_from

    assert dynamo_plugin_from(_request(name, "--dynamo_backend", "no").dynamo) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIG_DIR / name), "--dynamo_backend", "no", "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.dynamo_backend == "no"


def test_one_key_turns_compilation_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The YAML's own opt-out: dynamo_backend: 'NO' (the comment in every GPU config says so)."""
    from dialogsum.distributed import dynamo_plugin_from

    text = (CONFIG_DIR / "single_gpu.yaml").read_text()
    assert "dynamo_backend: 'NO'" in text
    eager = tmp_path / "eager.yaml"
    eager.write_text(text.replace("dynamo_backend: INDUCTOR", "dynamo_backend: 'NO'"))
    assert dynamo_plugin_from(_request(str(eager)).dynamo) is None
