"""The Accelerator for whatever ``accelerate launch`` configured, with the traps of this stack closed.

The same training code runs on one CPU, several CPU processes (gloo), one or many GPUs (DDP), DeepSpeed
ZeRO-2/3, FSDP and several machines; only ``accelerate launch --config_file accelerate_configs/<x>.yaml``
changes. Four things go wrong silently if left to defaults, and this module fixes or refuses each:

* **One process instead of N.** ``accelerate launch --cpu --num_processes 2`` and a ``distributed_type:
  MULTI_CPU`` config start ONE process, which then trains alone. A ``MULTI_GPU`` + ``use_cpu`` config starts N
  processes that each believe they are alone. :func:`build_accelerator` compares the world size it got with
  what the launcher was asked for and raises :class:`~dialogsum.errors.UserError` when they differ; processes
  started without a GPU are put on the CPU backend (gloo) so that they really communicate.
* **DeepSpeed on CPU** needs an explicit ``gloo`` backend, otherwise its batch-size check fails with a
  misleading "train_batch_size is not equal to ..." error.
* **Half the CPU.** The launcher exports ``OMP_NUM_THREADS=1`` to a single CPU process unless ``--cpu`` /
  ``use_cpu`` is given; torch then uses one core. We give each process its share of the cores instead.
* **An uncompiled DeepSpeed run.** The GPU configs compile the model (``dynamo_config``); accelerate's
  DeepSpeed launcher does not pass that section on to the processes (its other launchers do), so
  :func:`build_accelerator` reads it from the launcher's config file and passes it on itself.

On a GPU, fp32 matmuls run as TF32 where the GPU has TF32 tensor cores (:func:`dialogsum.precision.enable_tf32`).

:func:`finish` tears the process group down cleanly (gloo aborts at interpreter exit about one run in four
otherwise).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs
from accelerate.utils import DynamoBackend, TorchDynamoPlugin

from dialogsum.config import plain_int
from dialogsum.cpu_runtime import tune_cpu_runtime
from dialogsum.errors import UserError
from dialogsum.precision import cpu_mixed_precision_override, enable_tf32
from dialogsum.process import launch_rank

logger = logging.getLogger(__name__)

#: The launch that really gives N communicating CPU processes, quoted in error messages.
MULTI_CPU_HINT = "accelerate launch --config_file accelerate_configs/multi_cpu.yaml"
#: How long a collective waits for every process by default (``--ddp_timeout``; the HF Trainer's default).
DEFAULT_DDP_TIMEOUT_S = 1800


@dataclass
class LaunchRequest:
    """What the user asked ``accelerate launch`` for, read from the launcher's own command line."""

    num_processes: int | None
    """Total processes requested (all machines), or None when unknown."""
    use_cpu: bool
    """``--cpu`` or ``use_cpu: true`` in the config file."""
    threads_explicit: bool
    """The user chose the thread count (``--num_cpu_threads_per_process`` or ``OMP_NUM_THREADS`` set)."""
    source: str
    """Where the numbers come from, for messages (``accelerate launch`` command line, environment)."""
    dynamo: dict[str, Any] = field(default_factory=dict)
    """The launcher's compile settings (``dynamo_backend``, ``dynamo_use_regional_compilation``, ...): the config
    file's ``dynamo_config``, or the ``--dynamo_*`` flags when given."""


def _launcher_argv() -> tuple[list[str], dict[str, str]] | None:
    """Command line and environment of the parent ``accelerate launch`` process, if that is our parent."""
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        argv = parent.cmdline()
        try:
            env = parent.environ()
        except (psutil.AccessDenied, OSError):
            env = {}
    except Exception:  # noqa: BLE001 - no psutil, no /proc, process gone: we simply know less
        return None
    for i, arg in enumerate(argv):
        if os.path.basename(arg).startswith("accelerate") and i + 1 < len(argv) and argv[i + 1] == "launch":
            return argv[i + 2 :], env
        if arg == "accelerate.commands.launch" or arg.endswith("accelerate/commands/launch.py"):
            return argv[i + 1 :], env
    return None


def launcher_command() -> list[str] | None:
    """The arguments given to the parent ``accelerate launch`` (what follows ``launch``: its flags, the script,
    the script's flags), or None when this process was not started by it."""
    found = _launcher_argv()
    return found[0] if found is not None else None


def _parse_launch_args(argv: list[str]) -> argparse.Namespace | None:
    """Parse ``accelerate launch`` arguments with accelerate's own parser (None if it refuses them)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    try:
        args, _ = parser.parse_known_args(argv)
    except SystemExit:
        return None
    return args


def _request_from_environment() -> LaunchRequest:
    env_world = os.environ.get("WORLD_SIZE")
    return LaunchRequest(
        num_processes=plain_int(env_world) if env_world else None,
        use_cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"),
        # accelerate launch always exports OMP_NUM_THREADS (1 by default); only count it as the user's choice
        # when no accelerate launcher set the environment up.
        threads_explicit="OMP_NUM_THREADS" in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ,
        source="environment (WORLD_SIZE)",
    )


def launch_request_from_argv(argv: list[str], launcher_env: dict[str, str]) -> LaunchRequest | None:
    """Read an ``accelerate launch`` command line (the arguments after ``launch``); None if unparsable.

    ``--num_processes`` wins over the config file (``--config_file`` or accelerate's default config), as in
    accelerate itself. ``launcher_env`` is the launcher's own environment (to see a user-set OMP_NUM_THREADS).
    """
    args = _parse_launch_args(argv)
    if args is None:
        return None
    num_processes = args.num_processes
    use_cpu = bool(args.cpu)
    dynamo: dict[str, Any] = {}
    config_file = args.config_file
    if config_file is None:
        from accelerate.commands.config import default_config_file

        if os.path.isfile(default_config_file) and not args.cpu:
            config_file = default_config_file
    if config_file is not None and os.path.isfile(config_file):
        from accelerate.commands.config import load_config_from_file

        try:
            config = load_config_from_file(config_file)
        except Exception:  # noqa: BLE001 - the launcher accepted it; an odd file must not fail our side
            config = None
        if config is not None:
            if num_processes is None and getattr(config, "num_processes", None) not in (None, -1):
                num_processes = int(config.num_processes)
            use_cpu = use_cpu or bool(getattr(config, "use_cpu", False))
            # accelerate prefixes dynamo_config's keys with dynamo_ when they lack it
            found = getattr(config, "dynamo_config", None) or {}
            dynamo = {k if k.startswith("dynamo_") else f"dynamo_{k}": v for k, v in found.items()}
    if args.dynamo_backend is not None:  # the command line wins over the config file
        dynamo = {
            "dynamo_backend": args.dynamo_backend,
            "dynamo_mode": args.dynamo_mode,
            "dynamo_use_fullgraph": args.dynamo_use_fullgraph,
            "dynamo_use_regional_compilation": args.dynamo_use_regional_compilation,
        }
        if args.dynamo_use_dynamic is not None:
            dynamo["dynamo_use_dynamic"] = args.dynamo_use_dynamic
    return LaunchRequest(
        num_processes=num_processes,
        use_cpu=use_cpu,
        threads_explicit=args.num_cpu_threads_per_process is not None or "OMP_NUM_THREADS" in launcher_env,
        source="the `accelerate launch` command line and config file",
        dynamo=dynamo,
    )


def _flag(value: Any) -> bool:
    """A YAML or command-line boolean (``true``, ``"True"``, ``1``)."""
    return str(value).strip().lower() in ("1", "true", "yes")


def dynamo_plugin_from(settings: dict[str, Any]) -> TorchDynamoPlugin | None:
    """The compile settings of a launcher config (:attr:`LaunchRequest.dynamo`) as accelerate's plugin, or None
    when they do not compile (no ``dynamo_backend``, or ``no``)."""
    backend = str(settings.get("dynamo_backend") or "no").upper()
    if backend == "NO":
        return None
    dynamic = settings.get("dynamo_use_dynamic")
    return TorchDynamoPlugin(
        backend=backend,
        mode=str(settings.get("dynamo_mode") or "default"),
        fullgraph=_flag(settings.get("dynamo_use_fullgraph", False)),
        dynamic=None if dynamic is None else _flag(dynamic),
        use_regional_compilation=_flag(settings.get("dynamo_use_regional_compilation", False)),
    )


def compiles(accelerator: Accelerator) -> bool:
    """Whether ``prepare`` compiles the model (the launcher config sets a ``dynamo_backend``)."""
    return accelerator.state.dynamo_plugin.backend != DynamoBackend.NO


def read_launch_request() -> LaunchRequest:
    """Find out how many processes the user asked for (and whether on CPU).

    The parent ``accelerate launch`` command line is the most faithful source (see
    :func:`launch_request_from_argv`). Without such a parent (``torchrun``, the DeepSpeed launcher, SLURM,
    SageMaker), ``WORLD_SIZE`` is what was asked for.
    """
    from_env = _request_from_environment()
    found = _launcher_argv()
    request = launch_request_from_argv(*found) if found is not None else None
    if request is None:
        return from_env
    if request.num_processes is None:
        request.num_processes = from_env.num_processes
    request.use_cpu = request.use_cpu or from_env.use_cpu
    return request


def _gpu_available() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def _set_cpu_threads(request: LaunchRequest, local_world_size: int, fixed: int | None = None) -> None:
    """Give this CPU process ``fixed`` threads, else its share of the cores unless the user chose a count."""
    if fixed is not None:
        torch.set_num_threads(fixed)
        logger.info("CPU threads per process: %d (this run's setting)", fixed)
        return
    share = max(1, _available_cores() // max(1, local_world_size))
    current = torch.get_num_threads()
    if request.threads_explicit:
        logger.info("CPU threads per process: %d (set by the user)", current)
        return
    if current < share:
        torch.set_num_threads(share)
    logger.info(
        "CPU threads per process: %d (%d cores / %d local processes)",
        torch.get_num_threads(),
        _available_cores(),
        local_world_size,
    )


def build_accelerator(
    gradient_accumulation_steps: int = 1,
    log_with: list[str] | None = None,
    project_dir: str | None = None,
    ddp_timeout: int = DEFAULT_DDP_TIMEOUT_S,
    cpu_threads: int | None = None,
) -> Accelerator:
    """Build the :class:`~accelerate.Accelerator` for the current launch, checked and tuned for CPU.

    * Without a GPU, several processes run on the CPU backend (gloo), DeepSpeed included.
    * Every collective waits at most ``ddp_timeout`` seconds for the other processes (``--ddp_timeout``);
      :func:`collective_timeout_error` turns a timed-out one into an error naming the process that did not come.
    * Raises :class:`UserError` when the number of processes differs from what the launcher was asked for.
    * On CPU, each process gets ``cpu_threads`` torch threads when given (the quick start's tiny model: 1), else
      ``cores // local processes`` unless the user chose a count; and the runtime settings of
      :mod:`dialogsum.cpu_runtime` (denormals flushed, freed memory kept).
    """
    request = read_launch_request()
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    on_cpu = not _gpu_available() or request.use_cpu
    if on_cpu:
        # first, before any tensor work (the bf16 probe below runs matmuls): tuned after one matmul, a
        # flan-t5-base step stayed 25% slower (see dialogsum/cpu_runtime.py)
        tune_cpu_runtime()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs_handlers: list[Any] = []
    if on_cpu and (env_world > 1 or deepspeed):
        # gloo is the CPU collective backend; DeepSpeed on CPU fails without it being named explicitly.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=ddp_timeout)))
    elif env_world > 1:
        kwargs_handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout)))
    PROGRESS.timeout_s = ddp_timeout
    # bf16 autocast on the CPU only where it is native (emulated bf16 is slower than fp32; fp16 is refused)
    mixed_precision = cpu_mixed_precision_override() if on_cpu and not deepspeed else None
    dynamo_plugin = None
    if deepspeed and not on_cpu and "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        # accelerate's DeepSpeed launcher does not export the config's dynamo_config as ACCELERATE_DYNAMO_*
        # (its other launchers do), so the model would silently stay uncompiled: pass the settings on ourselves
        dynamo_plugin = dynamo_plugin_from(request.dynamo)
    accelerator = Accelerator(
        # cpu=True makes accelerate treat a multi-process CPU launch as MULTI_CPU instead of N lone processes.
        # DeepSpeed must not get it: accelerate would then skip DeepSpeed's own initialisation.
        cpu=on_cpu and not deepspeed,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=kwargs_handlers,
        mixed_precision=mixed_precision,
        dynamo_plugin=dynamo_plugin,
    )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate quietly runs an FSDP config as plain data parallel on the CPU.
        raise UserError(
            f"the accelerate config asks for FSDP, which needs GPUs; this run would be "
            f"{accelerator.distributed_type.value} instead. On CPU use accelerate_configs/multi_cpu.yaml (data "
            "parallel) or accelerate_configs/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no (sharded)."
        )
    requested = request.num_processes
    if requested is not None and requested != accelerator.num_processes:
        hint = f" To run {requested} communicating processes on CPU use: {MULTI_CPU_HINT}." if on_cpu else ""
        raise UserError(
            f"{requested} processes were requested (from {request.source}) but this run has "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type.value}); "
            f"training would silently run alone.{hint}"
        )
    if accelerator.device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
        _set_cpu_threads(request, local_world, cpu_threads)
    enable_tf32(accelerator.device)  # fp32 matmuls on TF32 tensor cores, where the GPU has them
    if compiles(accelerator):
        plugin = accelerator.state.dynamo_plugin
        logger.info(
            "compiling the model: %s, mode %s%s (launcher config; dynamo_backend: 'no' turns it off)",
            plugin.backend.value.lower(),
            plugin.mode,
            ", regional (one T5 block compiled, reused)" if plugin.use_regional_compilation else "",
        )
    return accelerator


def set_deepspeed_micro_batch(accelerator: Accelerator, per_device_train_batch_size: int) -> None:
    """Tell DeepSpeed the per-process micro-batch size (no-op without DeepSpeed); call before ``prepare``.

    accelerate fills DeepSpeed's ``train_micro_batch_size_per_gpu`` from ``DataLoader.batch_size``, which is
    None for a loader built on a batch sampler (our length-grouped one): ``prepare`` then fails with "At
    least one of the dataloaders passed to `accelerate.prepare()` has `None` as batch size".
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = per_device_train_batch_size


def is_zero3(accelerator: Accelerator) -> bool:
    """True when DeepSpeed ZeRO-3 shards the parameters (``generate`` then needs ``synced_gpus=True``)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and int(plugin.zero_stage) == 3


def optimizer_offload(accelerator: Accelerator) -> str | None:
    """The device DeepSpeed offloads the optimizer states to (``cpu``, ``nvme``), from the plugin's resolved config;
    None without DeepSpeed or without offload."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    device = offload.get("device", "none")
    return None if device in (None, "none") else str(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process so far, in MB (10^6 bytes).

    On CUDA: the largest memory ever allocated by tensors on ``device`` (``torch.cuda.max_memory_allocated``).
    Elsewhere: the process's peak resident set size (``getrusage``; KiB on Linux, bytes on macOS).
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def finish(accelerator: Accelerator) -> None:
    """Wait for every process, end the trackers, then destroy the process group (safe on one process).

    ``end_training`` already destroys the process group in accelerate >= 1.x, so the barrier must come first;
    the explicit destroy afterwards covers older versions and notebook (fork) launches.
    """
    from dialogsum.run_folder import release_output_dirs

    try:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    finally:
        release_output_dirs()  # the output folder's manifest recorded and its lock let go


# --------------------------------------------------------------------------------------------- a hung process


@dataclass
class Progress:
    """Where this process is, for the error of a collective that timed out (``--ddp_timeout``)."""

    where: str = "the start of the run"
    """What the process was doing: ``training step 12``, ``evaluating on test``, ..."""
    timeout_s: int = DEFAULT_DDP_TIMEOUT_S
    """The collective timeout in force (``--ddp_timeout``)."""


#: This process's :class:`Progress`, updated by the training loop and evaluation (one assignment, no I/O).
PROGRESS = Progress()
#: How long the processes that saw a collective time out wait for one another before naming the missing ones.
ARRIVAL_GRACE_S = 5.0


def mark_progress(where: str) -> None:
    """Record what this process is doing now (named if a collective times out)."""
    PROGRESS.where = where


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that waited longer than the timeout for another process.

    gloo raises a plain ``RuntimeError`` ("[...gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting
    10000ms for recv operation to complete"); torch's own waits say "timed out" too. (NCCL's watchdog aborts the
    process instead, with its own "Watchdog caught collective operation timeout" line.)
    """
    return (
        isinstance(exc, RuntimeError)
        and "timed out" in str(exc).lower()
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def is_peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective whose peer process ended (gloo: "Connection closed by peer ... typically
    caused by a remote worker crashing"); that process printed its own error."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and ("Connection closed by peer" in text or "Connection reset by peer" in text)
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (a timed-out all-reduce is often followed
    by a failing barrier in a ``finally``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def collective_failure_message(exc: BaseException, store: Any | None) -> str | None:
    """The one line for a collective that failed because of another process (timed out, or the process ended),
    or None for any other error."""
    chain = _chain(exc)
    if any(is_collective_timeout(e) for e in chain):
        return collective_timeout_message(store)
    if any(is_peer_gone(e) for e in chain):
        return f"a collective at {PROGRESS.where} failed: another process ended (its own error is printed above)"
    return None


def collective_timeout_message(store: Any | None) -> str:
    """The one line for a timed-out collective, naming the processes that did not arrive.

    Every process that saw the timeout writes its rank into the launcher's store (``store``; the process group
    itself is unusable now) and waits :data:`ARRIVAL_GRACE_S` for the others: the ranks that never write are the
    hung ones. Without a store, the message says so instead.
    """
    rank = launch_rank()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    prefix = f"dialogsum/arrived/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    missing: list[int] | None = None
    if store is not None:
        try:
            store.set(f"{prefix}{rank}", PROGRESS.where)
            deadline = time.monotonic() + ARRIVAL_GRACE_S
            while True:
                missing = [r for r in range(world) if not store.check([f"{prefix}{r}"])]
                if not missing or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store is gone too: fall back to a message without names
            missing = None
    if missing:
        who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}"
        what = f"{who} did not arrive"
    elif missing == []:
        what = "every process arrived late"
    else:
        what = "another process did not arrive"
    return (
        f"a collective at {PROGRESS.where} timed out after --ddp_timeout {PROGRESS.timeout_s} s: {what} (stopped, "
        "hung on I/O or a deadlock, or far slower); every process stops here. Continue from the latest complete "
        "checkpoint with --resume_from_checkpoint latest; raise --ddp_timeout if that process was only slow"
    )


# --------------------------------------------------------------------------------------------- one shared folder

#: How long a process looks for the file the main process wrote (a network file system may show it late).
SHARED_CHECK_WAIT_S = 5.0


def _sees(probe: Path, token: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.read_text(encoding="utf-8") == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def check_shared_folder(accelerator: Accelerator, folder: Path, flag: str) -> None:
    """Refuse several processes that do not all see the same ``folder`` (before the first checkpoint).

    Checkpoints are written by every process into one folder and read back by every process on a resume, so
    machines without a shared disk would each keep part of a checkpoint and disagree on where to resume. The
    main process writes a random token into ``folder``; after a barrier every process reads it back and the
    answers are gathered. ``flag`` names the setting in the message.
    """
    if accelerator.num_processes == 1:
        return
    import secrets
    import socket

    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = folder / f".dialogsum-shared-check-{token[0]}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token[0]), encoding="utf-8")
    accelerator.wait_for_everyone()
    seen = _sees(probe, str(token[0]), SHARED_CHECK_WAIT_S)
    answers = gather_object([(accelerator.process_index, seen, socket.gethostname())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, ok, host in answers if not ok]
    if blind:
        names = ", ".join(f"{rank} (on {host})" for rank, host in blind)
        raise UserError(
            f"{flag} {folder} is not one folder shared by every process: rank(s) {names} do not see the file "
            f"rank 0 wrote there. Checkpoints and resuming on several machines need a shared folder (NFS, EFS, "
            f"FSx, a cluster file system): give one as {flag}"
        )


def agree_on_resume(accelerator: Accelerator, resume: Path | None) -> Path | None:
    """The checkpoint every process resumes from: the main process's choice, checked on every process.

    Each process resolved ``--resume_from_checkpoint latest`` on its own; a checkpoint completed in between
    could make them differ, and processes resuming from different steps would deadlock or diverge.
    """
    if accelerator.num_processes == 1:
        return resume
    from accelerate.utils import broadcast_object_list

    chosen = [str(resume) if resume is not None else None]
    broadcast_object_list(chosen)
    agreed = Path(chosen[0]) if chosen[0] is not None else None
    if agreed != resume:
        logger.warning("resuming from %s, as the main process (this process found %s)", agreed, resume)
    return agreed
