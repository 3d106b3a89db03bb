"""Command-line plumbing shared by the scripts: logging setup and turning user errors into one line.

Every script ends with ``run_cli(main)``: ``main(argv)`` parses its flags first and imports torch and
transformers only after they are valid, so a bad flag is one ``error:`` line in a fraction of a second.

With several processes every process usually raises the same error (checks run everywhere, divergence is decided
on all-reduced values), so the main process prints it and every process exits with the same code. A process whose
error the main process did not raise too (a file only it cannot read, a hung peer it waited for) prints its own
line, prefixed ``[rank N]``: a failing process is never silent. The processes compare their errors through the
launcher's key-value store (torchrun / ``accelerate launch``). A training stopped early with a checkpoint (a stop
signal, ``--max_time``) prints one ``stopped:`` line and exits with :data:`~dialogsum.preemption.EXIT_STOPPED`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from dialogsum.errors import ConfigError, UserError
from dialogsum.formatting import printable, shorten
from dialogsum.preemption import TrainingStopped
from dialogsum.process import is_main_launch_process, launch_rank


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error:`` line (a :class:`ConfigError`, exit code 2)
    instead of the usage text and a ``prog: error:`` line."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{printable(message)} (see --help)")


def setup_logging() -> None:
    """INFO logs on the main process (rank 0), warnings only elsewhere; quiet third-party chatter."""
    logging.basicConfig(
        level=logging.INFO if is_main_launch_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed", "DeepSpeed", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # read by transformers when it is imported (later, only if needed): importing it here would cost ~3 s
    # before a bad flag could even be reported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _teardown_distributed() -> None:
    if "torch.distributed" not in sys.modules:  # never started: nothing to tear down (and no slow import)
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort while already exiting on an error
        pass


#: How long another process waits for the main process to report its error before printing its own line (the
#: processes of a launch check their flags and files a little apart, more so on a busy machine).
MAIN_REPORT_WAIT_S = 3.0


def launcher_store() -> Any | None:
    """A client of the key-value store the launcher (torchrun's agent, ``accelerate launch``) serves to every
    process of the job, reachable before and after the process group exists; None without one."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        from datetime import timedelta

        import torch.distributed as dist

        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=5),
            wait_for_workers=False,
        )
    except Exception:  # noqa: BLE001 - no store reachable: every process then speaks for itself
        return None


def _error_key(rank: int) -> str:
    return f"dialogsum/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _main_raised_the_same(store: Any | None, message: str, wait_s: float) -> bool:
    """Whether the main process reported ``message`` too (waiting up to ``wait_s`` for it to report)."""
    if store is None:
        return False
    deadline = time.monotonic() + wait_s
    try:
        while True:
            if store.check([_error_key(0)]):
                return store.get(_error_key(0)).decode("utf-8", "replace") == message
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store went away: say it ourselves
        return False


def _leave(message: str, code: int, settle_s: float, every_rank_alike: bool = False) -> None:
    """Print ``message`` once (main process) and exit with ``code`` on every process.

    Another process prints its own ``[rank N]`` line unless the main process reported the same message
    (``every_rank_alike``: they left together, e.g. a collective stop; nothing to compare).

    A launcher that sees one process exit with an error terminates the others (SIGTERM), which would then end
    with -15 instead of ``code``, the main process perhaps before its line is out. So SIGTERM is ignored from
    here on, and the other processes wait ``settle_s`` before leaving, to let the main process go first.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = time.monotonic()
    if is_main_launch_process():
        store = None if every_rank_alike else launcher_store()
        if store is not None:
            try:
                store.set(_error_key(0), message)
            except Exception:  # noqa: BLE001 - the others then print their own lines
                pass
        sys.stderr.write(message + "\n")
    elif not every_rank_alike and not _main_raised_the_same(launcher_store(), message, MAIN_REPORT_WAIT_S):
        sys.stderr.write(f"[rank {launch_rank()}] {message}\n")
    _teardown_distributed()
    if not is_main_launch_process():
        time.sleep(max(0.0, settle_s - (time.monotonic() - started)))
    sys.exit(code)


def _collective_failure(exc: Exception) -> str | None:
    """The line for a collective that failed because of another process: it timed out waiting for it
    (``--ddp_timeout``) or the process ended; None for any other error."""
    if "dialogsum.distributed" not in sys.modules:  # no process group was ever built
        return None
    from dialogsum import distributed

    return distributed.collective_failure_message(exc, launcher_store())


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit: 0 on success, ``error: <message>`` + the error's exit code on a UserError,
    ``stopped: <message>`` + :data:`~dialogsum.preemption.EXIT_STOPPED` when training stopped with a checkpoint."""
    setup_logging()
    try:
        main(argv)
    except UserError as exc:
        _leave(f"error: {exc}", exc.exit_code, settle_s=1.0)  # the processes may fail a little apart
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        # a path no filesystem can hold, met wherever a script first touches it
        name = shorten(os.fsdecode(exc.filename)) if exc.filename is not None else "a path"
        _leave(f"error: {name}: a name in this path is longer than the filesystem allows", 1, settle_s=1.0)
    except TrainingStopped as exc:
        # they left the loop together (a barrier)
        _leave(f"stopped: {exc}", exc.exit_code, settle_s=0.2, every_rank_alike=True)
    except KeyboardInterrupt:
        _leave("interrupted", 130, settle_s=1.0, every_rank_alike=True)  # Ctrl-C reaches every process
    except Exception as exc:
        failed = _collective_failure(exc)  # a peer timed out or ended: one line, not a gloo traceback
        if failed is None:
            raise
        _leave(f"error: {failed}", 1, settle_s=1.0)
    sys.exit(0)
