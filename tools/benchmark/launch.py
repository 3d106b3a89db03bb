"""One case in its own process: forked from a server that has only imported the libraries (peak RSS or peak GPU
memory is then that case's own, and no allocator state leaks from one case into the next), with the
``ACCELERATE_*`` variables ``accelerate launch`` would export for the case's launcher config (DeepSpeed's too),
changed only where the case differs (precision, eager, buckets)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dialogsum.files import write_json
from tools import REPO
from tools.benchmark.cases import Case
from tools.benchmark.worker import run_worker

CONFIG_DIR = REPO / "accelerate_configs"
#: The launcher config whose dynamo_config compiled cases use when their own config does not compile.
GPU_CONFIG = CONFIG_DIR / "single_gpu.yaml"

#: Modules imported once by the fork server; every case process is forked from it with them loaded.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.t5.modeling_t5",
    "accelerate",
    "peft",
    "tools.benchmark.worker",
    "dialogsum.distributed",
    "dialogsum.evaluation",
    "dialogsum.modeling",
    "dialogsum.training",
]


def dynamo_settings(config: Path) -> dict[str, Any]:
    """A launcher config's ``dynamo_config``, keys prefixed with ``dynamo_`` as accelerate reads them."""
    import yaml

    found = (yaml.safe_load(config.read_text()) or {}).get("dynamo_config") or {}
    return {k if k.startswith("dynamo_") else f"dynamo_{k}": v for k, v in found.items()}


def _launcher_env(config: Path) -> dict[str, str]:
    """The ``ACCELERATE_*`` variables ``accelerate launch --config_file <config> --num_processes 1`` gives its
    process (accelerate's own parser, checks and environment builders)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_simple_launcher_cmd_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "--num_processes", "1", "benchmark"])
    launch_logger = logging.getLogger("accelerate.commands.launch")
    level = launch_logger.level
    launch_logger.setLevel(logging.ERROR)  # its notes on defaults it filled in concern a command line, not us
    try:
        args, defaults, precision_from_config = _validate_launch_command(args)
    finally:
        launch_logger.setLevel(level)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def _dynamo_env(settings: dict[str, Any]) -> dict[str, str]:
    """``ACCELERATE_DYNAMO_*`` for compile settings, as the launcher exports them."""
    from dialogsum.distributed import dynamo_plugin_from

    plugin = dynamo_plugin_from(settings)
    if plugin is None:
        return {"ACCELERATE_DYNAMO_BACKEND": "NO"}
    env = {
        "ACCELERATE_DYNAMO_BACKEND": plugin.backend.value,
        "ACCELERATE_DYNAMO_MODE": plugin.mode,
        "ACCELERATE_DYNAMO_USE_FULLGRAPH": str(bool(plugin.fullgraph)),
        "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": str(bool(plugin.use_regional_compilation)),
    }
    if plugin.dynamic is not None:
        env["ACCELERATE_DYNAMO_USE_DYNAMIC"] = str(plugin.dynamic)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(case: Case, default_config: Path) -> dict[str, str | None]:
    """Environment changes of a case process (None = unset): what ``accelerate launch`` would export for the
    case's launcher config, changed where the case differs from it (precision, compiled or eager)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ACCELERATE_")}
    config = CONFIG_DIR / case.launch_config if case.launch_config else default_config
    if case.loop == "ours":
        env.update(_launcher_env(config))
        if case.compiled:  # the config's own dynamo_config (also under DeepSpeed, whose launcher drops it)
            env.update(_dynamo_env(dynamo_settings(config) or dynamo_settings(GPU_CONFIG)))
        else:
            env.update(_dynamo_env({}))
    env.update(
        {
            "ACCELERATE_MIXED_PRECISION": case.precision,
            # measure bf16 even where the guard would fall back to fp32
            "DIALOGSUM_CPU_BF16": "force" if case.force_precision else None,
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    distributed = dict.fromkeys(("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # DeepSpeed wants a process group even for one process: what torchrun gives a single process
        distributed.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        distributed["MASTER_PORT"] = str(_free_port())
    env.update(distributed)
    return env


def _worker_entry(spec_path: str, result_path: str, log_path: str, env: dict[str, str | None]) -> None:
    """Body of a case process: output to its log file, environment as ``accelerate launch`` would set it."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    run_worker(spec_path, result_path)


def case_context() -> Any:
    """A fork server that has imported torch/transformers/peft once (each case saves those seconds).

    Nothing runs in it but imports, so each forked case starts with fresh threads, allocator and accelerate
    state, and its peak memory is its own.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_case(
    case: Case, spec: dict[str, Any], work: Path, timeout: int, ctx: Any, env: dict[str, str | None]
) -> dict[str, Any]:
    """One case in its own process; a case that fails or times out comes back as ``{"failed": why, ...}``."""
    spec_path, result_path = work / f"{case.name}.spec.json", work / f"{case.name}.json"
    log_path = work / f"{case.name}.log"
    write_json(spec_path, {**spec, "case": asdict(case)})
    load_before = os.getloadavg()[0]
    proc = ctx.Process(target=_worker_entry, args=(str(spec_path), str(result_path), str(log_path), env))
    proc.start()
    proc.join(timeout)
    tail = lambda: "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]) if log_path.exists() else ""  # noqa: E731
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"failed": f"took longer than {timeout} s (--worker_timeout_s)", "log_tail": tail()}
    if proc.exitcode != 0 or not result_path.is_file():
        return {"failed": f"exit code {proc.exitcode}", "log_tail": tail()}
    result = json.loads(result_path.read_text())
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result
