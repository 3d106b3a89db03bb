"""Command-line plumbing shared by the scripts: logging setup and turning user errors into one line.

Every script ends with ``run_cli(main)``: ``main(argv)`` parses its flags first and imports torch and
transformers only after they are valid, so a bad flag is one ``error:`` line in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from dialogsum.errors import UserError


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


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit: 0 on success, ``error: <message>`` + the error's exit code on a UserError."""
    setup_logging()
    try:
        main(argv)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        _teardown_distributed()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        _teardown_distributed()
        sys.exit(130)
    sys.exit(0)
