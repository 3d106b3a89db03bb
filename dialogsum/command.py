"""The command line a run records (``metrics.json``, the lock file, the run report): as it was typed, with the
value of every secret flag masked."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

#: Settings never written to config.yaml, a tracker or metrics.json.
SECRET_FIELDS = ("hub_token",)


def mask_secrets(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every secret flag (``--hub_token x``, ``--hub_token=x``) replaced by ``***``."""
    masked, hide_next = [], False
    for arg in args:
        flag = arg.split("=", 1)[0]
        if hide_next:
            masked.append("***")
        elif flag.lstrip("-") in SECRET_FIELDS and "=" in arg:
            masked.append(f"{flag}=***")
        else:
            masked.append(arg)
        hide_next = not hide_next and arg.lstrip("-") in SECRET_FIELDS and arg.startswith("--")
    return masked


def command_line(argv: Sequence[str] | None, script: str) -> str:
    """``python <script> <flags>`` as this process was started (secrets masked); :func:`dialogsum.tracking.
    provenance` puts the ``accelerate launch`` command in its place when that launcher started the process."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["python", script, *mask_secrets(args)])
