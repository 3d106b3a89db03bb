"""Command-line plumbing shared by the scripts: logging setup and turning user errors into one line.

Every script ends with ``run_cli(main)``: ``main(argv)`` parses its flags first and imports torch and
transformers only after they are valid, so a bad flag is one ``error:`` line in a fraction of a second.

With several processes every process raises the same error (checks run everywhere, divergence is decided on
all-reduced values), so only the main process prints it and every process exits with the same code. A training
stopped early with a checkpoint (a stop signal, ``--max_time``) prints one ``stopped:`` line and exits with
:data:`~dialogsum.preemption.EXIT_STOPPED`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from dialogsum.errors import UserError
from dialogsum.formatting import shorten
from dialogsum.preemption import TrainingStopped


def setup_logging() -> None:
    """INFO logs on the main process (rank 0), warnings only elsewhere; quiet third-party chatter."""
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
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


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _leave(message: str, code: int, settle_s: float) -> None:
    """Print ``message`` once (main process) and exit with ``code`` on every process.

    A launcher that sees one process exit with an error terminates the others (SIGTERM), which would then end
    with -15 instead of ``code``, the main process perhaps before its line is out. So SIGTERM is ignored from
    here on, and the other processes wait ``settle_s`` before leaving, to let the main process go first.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _is_main_process():
        sys.stderr.write(message + "\n")
    _teardown_distributed()
    if not _is_main_process():
        time.sleep(settle_s)
    sys.exit(code)


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
        _leave(f"stopped: {exc}", exc.exit_code, settle_s=0.2)  # they left the loop together (a barrier)
    except KeyboardInterrupt:
        _leave("interrupted", 130, settle_s=1.0)
    sys.exit(0)
