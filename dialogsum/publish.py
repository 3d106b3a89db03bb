"""Publishing a run (or an exported model) to the Hugging Face Hub with ``huggingface_hub``.

:func:`check_push` runs with the other cheap checks, before any model is loaded: offline mode, a token
(``--hub_token``, ``HF_TOKEN`` or the saved ``hf auth login`` token), the hub reachable and the token accepted
with write access; a 3-hour run never dies at its upload. :func:`push_folder` uploads at the end exactly the
files of :func:`files_to_publish`: the model or adapter, tokenizer, generation config, model card, metrics,
training settings, report and plots. Never checkpoints (optimizer states, ~3 GB each for flan-t5-base), the
quick-start assets, tracker logs, a merged copy or ``predictions.jsonl`` (it holds the evaluation dialogues,
whose licence is the dataset's, not the model's).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dialogsum.config import HubArguments
from dialogsum.errors import UserError
from dialogsum.hub import hub_endpoint, hub_offline, whoami
from dialogsum.run_folder import MODEL_FILES

logger = logging.getLogger(__name__)

#: Top-level files that are uploaded when present.
PUBLISHED_FILES = (
    # the model or the adapter, its generation settings and the tokenizer
    *MODEL_FILES,
    # what the run says about itself: card, results, the settings (evaluate.py reads the prompt from them), report
    "README.md",
    "metrics.json",
    "config.yaml",
    "report.md",
)
#: Shards of a large model (model-00001-of-00002.safetensors) and the report's plots.
PUBLISHED_PATTERNS = (re.compile(r"^model-\d+-of-\d+\.safetensors$"), re.compile(r"^plots/[^/]+\.png$"))
#: Never uploaded, whatever they contain (passed to upload_folder as ignore patterns too).
NEVER_PUBLISHED = (
    "checkpoint-*",
    "checkpoint-*/**",
    "quickstart_assets/**",
    "merged/**",
    "wandb/**",
    "tensorboard/**",
    "predictions.jsonl",
)


def files_to_publish(folder: str | Path) -> list[str]:
    """The paths (relative, ``/``-separated, sorted) under ``folder`` that :func:`push_folder` uploads.

    Only reads the folder listing.
    """
    root = Path(folder)
    found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(
        path
        for path in found
        if ("/" not in path and path in PUBLISHED_FILES) or any(pattern.match(path) for pattern in PUBLISHED_PATTERNS)
    )


@dataclass(frozen=True)
class HubTarget:
    """Where :func:`push_folder` uploads: checked before any work by :func:`check_push`."""

    repo_id: str
    """``namespace/name``."""
    token: str
    private: bool
    endpoint: str

    @property
    def url(self) -> str:
        """The repository's page."""
        return f"{self.endpoint}/{self.repo_id}"


def hub_token(flag: str | None) -> str | None:
    """The token to write with: ``--hub_token``, else ``HF_TOKEN``, else the one saved by ``hf auth login``."""
    if flag:
        return flag
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def check_push(hub: HubArguments, default_name: str) -> HubTarget | None:
    """With ``--push_to_hub``: where the upload goes, after checking that it can happen (one :class:`UserError`
    otherwise); None without ``--push_to_hub``.

    ``default_name`` (the output folder's name) is the repository name when ``--hub_model_id`` is not given; a
    name without a namespace goes to the token's account.
    """
    if not hub.push_to_hub:
        return None
    if hub_offline():
        raise UserError("--push_to_hub needs the Hugging Face Hub, but offline mode (HF_HUB_OFFLINE) is set")
    token = hub_token(hub.hub_token)
    if not token:
        raise UserError(
            "--push_to_hub needs a Hugging Face token with write access: pass --hub_token, set HF_TOKEN, or run "
            "`hf auth login` once"
        )
    account = whoami(token)
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UserError("--push_to_hub: the Hugging Face token is read-only; use a token with write access")
    name = hub.hub_model_id or re.sub(r"[^\w.-]+", "-", default_name).strip("-.") or "dialogsum-model"
    repo_id = name if "/" in name else f"{account['name']}/{name}"
    logger.info("--push_to_hub: will upload to %s/%s as %s", hub_endpoint(), repo_id, account["name"])
    return HubTarget(repo_id=repo_id, token=token, private=hub.hub_private_repo, endpoint=hub_endpoint())


def push_folder(folder: str | Path, target: HubTarget, commit_message: str) -> str:
    """Create the repository if needed and upload :func:`files_to_publish` of ``folder``; return its URL."""
    from huggingface_hub import HfApi

    files = files_to_publish(folder)
    if not files:
        raise UserError(f"--push_to_hub: nothing to upload in {folder}")
    api = HfApi(endpoint=target.endpoint, token=target.token)
    try:
        api.create_repo(target.repo_id, private=target.private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=target.repo_id,
            folder_path=str(folder),
            repo_type="model",
            allow_patterns=files,
            ignore_patterns=list(NEVER_PUBLISHED),
            commit_message=commit_message,
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises HfHubHTTPError, httpx/requests errors, OSError
        raise UserError(
            f"--push_to_hub: uploading {folder} to {target.url} failed ({str(exc).splitlines()[0][:300]}); the "
            f"files are intact: upload them later with `hf upload {target.repo_id} {folder}`"
        ) from exc
    logger.info("uploaded %d files of %s to %s", len(files), folder, target.url)
    return target.url
