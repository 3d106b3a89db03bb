"""Fail fast when a Hugging Face Hub id is asked for and the hub cannot be reached.

Without this, ``from_pretrained`` / ``load_dataset`` spend ~25-50 s in retries before failing with a long
traceback. A local directory never goes through here; a hub id that is already in the local cache still works
offline.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from dialogsum.errors import UserError

CONNECT_TIMEOUT_S = 5.0


def hub_endpoint() -> str:
    """The hub URL in use (``HF_ENDPOINT`` or the public hub)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_cache(repo_id: str, kind: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        repo_type = "dataset" if kind == "dataset" else "model"
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # no cache directory yet, unreadable cache: treat as not cached
        return False


def ensure_hub_reachable(repo_id: str, kind: str, hint: str) -> None:
    """Raise one clear :class:`UserError` when ``repo_id`` would have to be downloaded and cannot be.

    ``kind`` is "model" or "dataset"; ``hint`` names the flag(s) that take local paths instead.
    """
    if _in_cache(repo_id, kind):
        return
    if hub_offline():
        raise UserError(
            f"cannot fetch {kind} {repo_id!r}: offline mode (HF_HUB_OFFLINE) is set and it is not in "
            f"the local cache; pass a local path with {hint}"
        )
    if not hub_reachable():
        raise UserError(
            f"cannot fetch {kind} {repo_id!r}: the Hugging Face Hub ({hub_endpoint()}) is unreachable "
            f"from this machine; pass a local path with {hint}"
        )
