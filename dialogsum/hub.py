"""The Hugging Face Hub seen from this machine: fail fast when it is needed and cannot be reached.

Without this, ``from_pretrained`` / ``load_dataset`` spend ~25-50 s in retries before failing with a long
traceback, and a ``--push_to_hub`` run would only find out at its very end. A local directory never goes through
here; a hub id that is already in the local cache still works offline.

Every probe is one HTTP request through ``huggingface_hub``'s own HTTP session, with a short timeout: it goes
where the library's downloads and uploads go, honouring ``HF_ENDPOINT`` and the proxy variables
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), so a machine that reaches the hub only through a proxy is seen as
online. Any HTTP answer means the hub is reachable; only a failed connection (refused, timed out, no route, DNS)
means it is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from dialogsum.errors import UserError

#: Seconds one probe may take, connection and answer included.
CONNECT_TIMEOUT_S = 5.0


def hub_endpoint() -> str:
    """The hub URL in use (``HF_ENDPOINT`` or the public hub), without a trailing slash."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@dataclass(frozen=True)
class HubAnswer:
    """The hub's answer to one probe: an HTTP status and its JSON body (when it sent one)."""

    status: int
    body: Any


class HubUnreachable(Exception):
    """No HTTP answer from the hub (the reason is the message)."""


def hub_request(path: str, token: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> HubAnswer:
    """GET ``<endpoint><path>`` through huggingface_hub's HTTP session (its proxies, certificates and headers).

    Raises :class:`HubUnreachable` when no HTTP answer comes back within ``timeout`` seconds.
    """
    from huggingface_hub.utils import get_session

    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        # requests (huggingface_hub < 1.0) and httpx (>= 1.0) sessions take the same call
        response = get_session().get(f"{hub_endpoint()}{path}", headers=headers, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - requests and httpx raise their own connection, proxy and timeout errors
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise HubUnreachable(reason) from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    return HubAnswer(status=int(response.status_code), body=body)


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True when the hub endpoint answers an HTTP request (any status) within ``timeout`` seconds."""
    try:
        hub_request("/api/whoami-v2", timeout=timeout)  # answers 401 without a token: an answer all the same
    except HubUnreachable:
        return False
    return True


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


def whoami(token: str) -> dict[str, Any]:
    """The hub account of ``token`` (``name``, ``auth.accessToken.role``, ...).

    Raises :class:`UserError` when the hub cannot be reached or rejects the token.
    """
    try:
        answer = hub_request("/api/whoami-v2", token=token)
    except HubUnreachable as exc:
        raise UserError(
            f"the Hugging Face Hub ({hub_endpoint()}) is unreachable from this machine ({exc}); check the network "
            "or HTTPS_PROXY/HF_ENDPOINT"
        ) from exc
    if answer.status == 401:
        raise UserError(
            f"the Hugging Face Hub ({hub_endpoint()}) rejected the token (HTTP 401): it is invalid or expired"
        )
    if answer.status != 200 or not isinstance(answer.body, dict) or not answer.body.get("name"):
        raise UserError(
            f"the Hugging Face Hub ({hub_endpoint()}) did not confirm the token (HTTP {answer.status}); try again later"
        )
    return answer.body
