"""Experiment tracking: which trackers a run uses, what it logs at the start and at the end, peak memory.

A training run calls :func:`resolve_trackers` before the Accelerator exists (its result is
``Accelerator(log_with=...)``), :func:`start_tracking` once the Accelerator is built (one W&B run per job, the
run config logged), and :func:`finish_tracking` after its files are written (final scalars, summary,
predictions table, model artifact); the training loop logs its own events with ``accelerator.log``.

W&B without an account: ``WANDB_MODE=offline`` writes the run under ``<dir>/wandb/offline-run-*`` (upload it
later with ``wandb sync``), ``WANDB_MODE=disabled`` turns W&B off. With neither a mode nor credentials, W&B
is dropped with one warning (see :func:`resolve_trackers`). Accelerate runs every tracker on the main process
only, so a job gives one W&B run whatever its number of processes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import netrc
import os
import random
import re
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dialogsum.checkpointing import checkpoint_root
from dialogsum.config import Config
from dialogsum.errors import UserError
from dialogsum.files import json_object_or_none, write_json
from dialogsum.formatting import is_number, markdown_table
from dialogsum.metrics import PROTOCOLS, ROUGE_KEYS, score_examples
from dialogsum.modeling import checkpoint_size_mb
from dialogsum.process import is_main_launch_process
from dialogsum.provenance import git_info, package_versions
from dialogsum.provenance import topology as provenance_topology
from dialogsum.run_folder import WANDB_RUN_FILE

logger = logging.getLogger(__name__)

#: Packages whose versions are logged with every run (absent ones are skipped).
#: Rows of the W&B predictions table (a seeded sample, kept in dataset order).
PREDICTION_TABLE_ROWS = 50
#: Rows of the predictions shown as Markdown text in TensorBoard.
TENSORBOARD_TEXT_ROWS = 5
#: The W&B server when nothing else is configured, and the host its Forge front end stands for.
_WANDB_DEFAULT_HOSTS = ("api.wandb.ai",)
#: Files of the output folder that are not part of a model/adapter artifact.
_NOT_IN_ARTIFACT = {"predictions.jsonl", "log_history.jsonl", WANDB_RUN_FILE}
_FINAL_KEYS = (
    "train_loss",
    "train_runtime_s",
    "train_samples_per_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "checkpoint_size_mb",
    "best_metric",
)

WANDB_NO_LOGIN_MESSAGE = (
    "W&B: no API key found (WANDB_API_KEY, ~/.netrc or `wandb login`) and WANDB_MODE is not set. "
    "Run `wandb login` to log to your account, or `export WANDB_MODE=offline` to keep the run on disk "
    "(upload it later with `wandb sync`), or `export WANDB_MODE=disabled` / `--report_to tensorboard|none` "
    "to train without W&B."
)


# --------------------------------------------------------------------------------------------- trackers


#: Seconds to wait for the W&B server to answer before a run is refused (or goes on without W&B).
WANDB_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WandbAccess:
    """What this process knows about W&B before any run starts (nothing here touches the network)."""

    installed: bool
    #: ``online``, ``offline``, ``dryrun`` (= offline), ``disabled``, ... as W&B resolves ``WANDB_MODE``
    #: and its settings files (``wandb offline`` writes one).
    mode: str
    #: An API key (or identity token) is configured: environment, netrc entry for the server, or settings.
    has_credentials: bool
    #: The server W&B talks to (``WANDB_BASE_URL``, else its default).
    base_url: str | None = None

    @property
    def disabled(self) -> bool:
        """W&B was switched off by the user (``WANDB_MODE=disabled``)."""
        return self.mode == "disabled"

    @property
    def offline(self) -> bool:
        """Runs are written to disk only; no account is needed."""
        return self.mode in ("offline", "dryrun")

    @property
    def usable(self) -> bool:
        """``wandb.init`` can start a run without asking for a login."""
        return self.installed and not self.disabled and (self.offline or self.has_credentials)


def _wandb_settings() -> tuple[str, str | None, str | None]:
    """``(mode, base_url, api_key)`` resolved the way ``wandb`` does (settings files, then environment)."""
    try:
        import wandb

        settings = wandb.Settings()
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        global_file = Path(config_dir).expanduser() / "settings" if config_dir else Path("~/.config/wandb/settings")
        settings.settings_system = str(global_file.expanduser())
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        return str(settings.mode), settings.base_url, settings.api_key
    except Exception as exc:  # noqa: BLE001 - any change of wandb's settings API falls back to the environment
        logger.debug("could not read W&B settings (%s); using the environment only", exc)
        return os.environ.get("WANDB_MODE", "online"), os.environ.get("WANDB_BASE_URL"), None


def _netrc_has_wandb_key(base_url: str | None) -> bool:
    """True when the netrc file (``$NETRC`` or ``~/.netrc``) has a password for the W&B server."""
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    if not path.is_file():
        return False
    try:
        entries = netrc.netrc(str(path))
    except (netrc.NetrcParseError, OSError) as exc:
        logger.debug("could not read %s: %s", path, exc)
        return False
    hosts = {urlsplit(base_url).netloc} if base_url else set()
    hosts.update(_WANDB_DEFAULT_HOSTS)
    for host in hosts:
        creds = entries.authenticators(host) if host else None
        if creds and creds[2]:
            return True
    return False


def wandb_access() -> WandbAccess:
    """Find out, offline and without starting W&B, whether a W&B run can start and in which mode."""
    if importlib.util.find_spec("wandb") is None:
        return WandbAccess(installed=False, mode="disabled", has_credentials=False)
    mode, base_url, settings_key = _wandb_settings()
    has_credentials = bool(
        os.environ.get("WANDB_API_KEY")
        or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
        or settings_key
        or _netrc_has_wandb_key(base_url)
    )
    return WandbAccess(installed=True, mode=mode, has_credentials=has_credentials, base_url=base_url)


def wandb_server_problem(base_url: str | None, timeout: float = WANDB_PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server cannot be reached (no network, refused, a bad URL), or None when it answers at all
    (any HTTP status counts); waits at most ``timeout`` seconds. Proxies from the environment are used."""
    import urllib.error
    import urllib.request

    url = base_url or f"https://{_WANDB_DEFAULT_HOSTS[0]}"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - W&B's own server URL
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return str(reason).splitlines()[0][:200] or type(exc).__name__


def resolve_trackers(report_to: str) -> list[str]:
    """Turn ``--report_to`` into the tracker names for ``Accelerator(log_with=...)``.

    ``all`` means W&B and TensorBoard, ``none`` means no tracker. Call it before building the Accelerator.
    W&B is listed first, so that a failure of ``wandb.init`` leaves no other tracker half started.

    W&B without an account (decided on rank 0 only, the one process that talks to W&B):

    * ``WANDB_MODE=offline`` (or ``dryrun``): kept; the run is written to disk.
    * ``WANDB_MODE=disabled``: W&B is left out (one info line).
    * no mode and no credentials (``WANDB_API_KEY``, a netrc entry or ``wandb login``):
      with ``--report_to all`` (the default) W&B is dropped with one warning that says how to log in or go
      offline, and training goes on with TensorBoard. With ``--report_to wandb`` the user asked for W&B
      explicitly: a run whose dashboard silently never appears would waste the whole training, so this raises
      :class:`UserError` at once, before any model or data is loaded.

    A tracker whose package is not installed is dropped with a warning, or raises :class:`UserError` when it
    was the one asked for. ``report_to`` is one of the settings' choices (checked once, with the other settings).
    """
    wanted = {"all": ["wandb", "tensorboard"], "wandb": ["wandb"], "tensorboard": ["tensorboard"], "none": []}
    explicit = report_to != "all"
    is_main = is_main_launch_process()
    trackers: list[str] = []
    for name in wanted[report_to]:
        if name == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                message = "TensorBoard is not installed (pip install tensorboard)"
                if explicit:
                    raise UserError(f"--report_to tensorboard: {message}")
                if is_main:
                    logger.warning("%s; logging without it.", message)
                continue
            trackers.append(name)
            continue
        if not is_main:
            # Only the main process starts the W&B run; the others keep the name so that every process builds
            # the same list (their W&B tracker never does anything).
            if importlib.util.find_spec("wandb") is not None:
                trackers.append(name)
            continue
        access = wandb_access()
        if not access.installed:
            if explicit:
                raise UserError("--report_to wandb: wandb is not installed (pip install wandb)")
            logger.warning("W&B is not installed (pip install wandb); logging without it.")
        elif access.disabled:
            logger.info("W&B is disabled by WANDB_MODE=disabled; logging without it.")
        elif not access.usable:
            if explicit:
                raise UserError(f"--report_to wandb: {WANDB_NO_LOGIN_MESSAGE}")
            logger.warning("%s Training continues without W&B.", WANDB_NO_LOGIN_MESSAGE)
        elif not access.offline and (problem := wandb_server_problem(access.base_url)):
            message = (
                f"the W&B server {access.base_url or _WANDB_DEFAULT_HOSTS[0]} cannot be reached ({problem}); check "
                "the network or WANDB_BASE_URL, or `export WANDB_MODE=offline` to keep the run on disk (upload it "
                "later with `wandb sync`)"
            )
            if explicit:
                raise UserError(f"--report_to wandb: {message}")
            logger.warning("W&B: %s. Training continues without W&B.", message)
        else:
            trackers.append(name)
    return trackers


# ------------------------------------------------------------------------------------------ run config


def default_run_name(method: str) -> str:
    """``<method>-<YYYYmmdd-HHMMSS>``, e.g. ``lora-20250101-120000``."""
    return f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class RunIdentity:
    """How a run is named in W&B (and TensorBoard): each flag, else its W&B environment variable, else a default."""

    project: str
    name: str
    entity: str | None
    group: str | None
    tags: list[str]


def run_identity(cfg: Config, job_type: str = "train") -> RunIdentity:
    """Resolve ``--wandb_project/--run_name/--wandb_entity/--wandb_group/--wandb_tags``: a flag wins, then
    ``WANDB_PROJECT``, ``WANDB_NAME``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``, ``WANDB_TAGS`` (comma-separated),
    then the defaults (project ``dialogsum``, name ``<method or eval>-<date>-<time>``)."""
    t, env = cfg.track, os.environ
    tags = list(t.wandb_tags) or [tag.strip() for tag in env.get("WANDB_TAGS", "").split(",") if tag.strip()]
    return RunIdentity(
        project=t.wandb_project or env.get("WANDB_PROJECT") or "dialogsum",
        name=t.run_name or env.get("WANDB_NAME") or default_run_name(cfg.method if job_type == "train" else job_type),
        entity=t.wandb_entity or env.get("WANDB_ENTITY") or None,
        group=t.wandb_group or env.get("WANDB_RUN_GROUP") or None,
        tags=tags,
    )


def run_config(accelerator: Any, cfg: Config, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The flat config a run logs: every flag, the learning rate in force, effective batch size, git commit,
    package versions (``version_<pkg>``), the launch topology, then ``extra`` (which wins on clashes)."""
    config = cfg.to_dict()
    config["learning_rate"] = cfg.learning_rate
    topology = provenance_topology(accelerator)
    # e.g. 8 per device x 4 accumulation x 2 processes = 64 examples per optimizer step
    config["effective_batch_size"] = (
        cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * topology["num_processes"]
    )
    config.update(git_info())
    config.update({f"version_{name}": version for name, version in package_versions().items()})
    config.update(topology)
    config.update(extra or {})
    return config


def hparams_safe(config: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """Config for TensorBoard's hparams, which accept only scalars and strings.

    Lists become ``"a, b"``, dicts JSON, None ``"None"``.
    """
    safe: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            safe[key] = value
        elif isinstance(value, (list, tuple, set)):
            safe[key] = ", ".join(str(v) for v in value)
        elif isinstance(value, Mapping):
            safe[key] = json.dumps(value, sort_keys=True, default=str)
        else:
            safe[key] = str(value)
    return safe


def _wandb_error_types() -> tuple[type[BaseException], ...]:
    try:
        from wandb.errors import Error
    except ImportError:
        return (TimeoutError,)
    return (Error, TimeoutError)


def _wandb_run_file(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / WANDB_RUN_FILE
    return json_object_or_none(path) or {}  # missing or unreadable: a new W&B run rather than no training


def wandb_run_id(folder: str | Path) -> str:
    """The W&B run id of the training run whose checkpoints are in ``folder``: ``$WANDB_RUN_ID``, else the one
    kept in ``folder/``:data:`WANDB_RUN_FILE`, else a new one, kept there (call on the main process), so that
    every restart of the run (``--resume_from_checkpoint latest``, a spot restart) logs to the same W&B run."""
    kept = _wandb_run_file(folder)
    run_id = os.environ.get("WANDB_RUN_ID") or kept.get("run_id")
    if not run_id:  # W&B's own form: 8 characters from [a-z0-9]
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if run_id != kept.get("run_id"):
        write_json(Path(folder) / WANDB_RUN_FILE, {"run_id": run_id, "logged_through_step": 0})
    return run_id


def resend_lost_events(accelerator: Any, folder: str | Path, events: Sequence[Mapping[str, Any]]) -> int:
    """Log to W&B again the events (``log_history.jsonl`` rows up to the resumed checkpoint) that a killed
    attempt may have taken with it; returns how many.

    W&B writes its run file every 15 s and uploads in the background, so a SIGKILL loses its last records. Sent
    again are the events after the last step W&B is known to hold (``logged_through_step`` of
    :data:`WANDB_RUN_FILE`, written when the trackers were closed by a stop) and from the step an online W&B
    run resumed at (``run.step``): every step once. TensorBoard is flushed at every checkpoint instead
    (:func:`flush_trackers`).
    """
    run = next((t.tracker for t in accelerator.trackers if t.name == "wandb"), None) if events else None
    if run is None:
        return 0
    after = max(int(_wandb_run_file(folder).get("logged_through_step", 0)), int(run.step) - 1)
    lost = [e for e in events if e["step"] > after]
    for event in lost:
        kind = "eval" if any(k.startswith("eval_") for k in event) else "train"
        run.log(tracked_values(event, kind), step=event["step"])
    return len(lost)


def tracked_values(event: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A log event as tracker values: ``{"train/loss": ...}``, ``{"eval/rougeL": ...}`` (``step`` and None left out)."""
    return {f"{kind}/{k.removeprefix(kind + '_')}": v for k, v in event.items() if k != "step" and v is not None}


def start_tracking(
    accelerator: Any,
    cfg: Config,
    extra: Mapping[str, Any] | None = None,
    job_type: str = "train",
    resumed_at: int | None = None,
) -> None:
    """Start the run of every tracker of ``accelerator`` and log the run config (:func:`run_config`).

    One run per job: accelerate runs trackers on the main process only. ``job_type`` is ``train`` or ``eval``
    (``scripts/evaluate.py``: the zero-shot baseline lands in the same project and group as the training runs).
    W&B gets the config with its real types (lists, None), the project, name, entity, group and tags of
    :func:`run_identity` (flags, else W&B's environment variables) and its files under ``$WANDB_DIR`` or else
    ``--output_dir``. TensorBoard gets the same config as hparams (:func:`hparams_safe`), under the project name.

    If ``wandb.init`` fails anyway (a rejected key, an unreachable server), the job goes on without W&B with a
    warning, unless ``--report_to wandb`` asked for it explicitly (then :class:`UserError`).

    A training run (``resumed_at``: the optimizer step it starts from, 0 when fresh) is one dashboard run however
    often it restarts: W&B continues the run id kept with the checkpoints (:func:`wandb_run_id`,
    ``resume="allow"``), and TensorBoard drops the events an earlier attempt logged after that step
    (``purge_step``), so each step is charted once.
    """
    if not accelerator.log_with:
        return
    identity = run_identity(cfg, job_type)
    config = run_config(accelerator, cfg, extra)
    config.update(
        {
            "run_name": identity.name,
            "wandb_project": identity.project,
            "wandb_entity": identity.entity,
            "wandb_group": identity.group,
            "wandb_tags": identity.tags,
        }
    )
    wandb_kwargs: dict[str, Any] = {
        "name": identity.name,
        "config": config,
        "entity": identity.entity,
        "group": identity.group,
        "tags": identity.tags or None,
        "job_type": job_type,
    }
    if not os.environ.get("WANDB_DIR") and cfg.train.output_dir:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        wandb_kwargs["dir"] = str(cfg.train.output_dir)
    others: dict[str, Any] = {}
    if resumed_at is not None:
        if "wandb" in [str(t) for t in accelerator.log_with] and accelerator.is_main_process:
            wandb_kwargs.update(id=wandb_run_id(checkpoint_root(cfg)), resume="allow")
        others["tensorboard"] = {"purge_step": resumed_at + 1}  # events of steps after it: a killed attempt's
    project = identity.project
    try:
        accelerator.init_trackers(project, config=None, init_kwargs={"wandb": wandb_kwargs, **others})
    except _wandb_error_types() as exc:
        # wandb is first in log_with, so no other tracker was started: drop the half-started one (ending it at
        # teardown would fail and hide this error) and start the others.
        accelerator.log_with = [t for t in accelerator.log_with if str(t) != "wandb"]
        accelerator.trackers = []
        if cfg.track.report_to == "wandb":
            raise UserError(f"--report_to wandb: W&B could not start a run: {exc}") from exc
        logger.warning("W&B could not start a run (%s); training continues without W&B.", exc)
        accelerator.init_trackers(project, config=None, init_kwargs=others)
    for tracker in accelerator.trackers:
        if tracker.name != "wandb":
            tracker.store_init_configuration(hparams_safe(config))


# ------------------------------------------------------------------------------------------- end of run


def flush_trackers(accelerator: Any) -> None:
    """Write what the trackers hold to disk now (TensorBoard; W&B has no such call): at every checkpoint, so that
    a killed run's events up to its newest checkpoint are kept."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.flush()


def close_trackers(accelerator: Any, folder: str | Path, step: int) -> None:
    """A stopped run that will resume: close every tracker now (main process), before the processes leave
    together (``end_training`` then has none left to close). Its W&B run is marked as preempting first
    (``Run.mark_preempting``), and ``folder/``:data:`WANDB_RUN_FILE` notes that W&B holds every step up to
    ``step`` (see :func:`resend_lost_events`)."""
    wandb_run = None
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            wandb_run = tracker.tracker
            wandb_run.mark_preempting()
        tracker.finish()
    if wandb_run is not None:
        write_json(Path(folder) / WANDB_RUN_FILE, {"run_id": wandb_run.id, "logged_through_step": step})
    accelerator.trackers = []


def sample_predictions(predictions: Sequence[Mapping[str, Any]], rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample of ``rows`` predictions (in their original order) with a per-row ``rougeL`` (0..1).

    ROUGE-L is taken from the row when present, otherwise computed with the project's scorer against all the
    row's references (best match, the headline protocol of :mod:`dialogsum.metrics`).
    """
    indices = list(range(len(predictions)))
    if len(indices) > rows:
        indices = sorted(random.Random(seed).sample(indices, rows))
    sample = [dict(predictions[i]) for i in indices]
    missing = [row for row in sample if row.get("rougeL") is None]
    if missing:
        references = [list(row.get("references") or [row.get("reference", "")]) for row in missing]
        references = [[r for r in refs if r] or [""] for refs in references]
        scores = score_examples([str(row.get("prediction", "")) for row in missing], references)
        for row, score in zip(missing, scores["multi_reference"]["rougeL"], strict=True):
            row["rougeL"] = score
    return sample


def _predictions_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Predictions as a Markdown table for TensorBoard's text tab."""
    header = ["id", "dialogue", "reference", "prediction", "ROUGE-L"]
    table = [[*(row.get(key, "") for key in header[:4]), f"{100 * float(row['rougeL']):.1f}"] for row in rows]
    return markdown_table(header, table, limit=300)


def final_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The end-of-run numbers charted as ``final/<key>``: ROUGE (headline, and ``final/<protocol>/<key>`` for
    every protocol sub-object), training loss/time/throughput, peak memory, checkpoint size and best metric.

    Settings and counts of ``metrics`` (learning rate, process count, parameter counts) go to the run
    summary only.
    """
    final: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping) and key in PROTOCOLS:
            final.update({f"final/{key}/{k}": v for k, v in value.items() if k in ROUGE_KEYS and is_number(v)})
        elif is_number(value) and (key in _FINAL_KEYS or key in ROUGE_KEYS):
            final[f"final/{key}"] = value
    return final


def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def finish_tracking(
    accelerator: Any,
    metrics: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    param_report: Mapping[str, Any],
    output_dir: str | Path,
    log_model: bool,
    step: int | None = None,
) -> None:
    """Log the end of a run. Call on every process after the model and files are saved; does not end the run.

    * the results of ``metrics`` (:func:`final_scalars`) are logged as ``final/<key>`` (W&B charts and
      TensorBoard scalars) at ``step`` (the last optimizer step; with None W&B takes its next step and
      TensorBoard step 0);
    * the W&B run summary gets the metrics (protocol sub-objects as nested dicts), the parameter report and
      ``checkpoint_size_mb`` (measured in ``output_dir`` when not in ``metrics``);
    * W&B table ``predictions``: a seeded sample of :data:`PREDICTION_TABLE_ROWS` rows (id, dialogue,
      reference, prediction, ROUGE-L); TensorBoard gets the first rows of it as Markdown text;
    * with ``log_model``, the top-level files of ``output_dir`` (weights or adapter, config, tokenizer, model
      card, metrics) become a W&B artifact of type ``model``.

    ``accelerator.end_training()`` stays with the caller.
    """
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    final = final_scalars(metrics)
    if final:
        accelerator.log(final, step=step)
    summary: dict[str, Any] = {key: value for key, value in metrics.items() if value is not None}
    summary.update({key: value for key, value in param_report.items() if value is not None})
    if Path(output_dir).is_dir():
        summary.setdefault("checkpoint_size_mb", checkpoint_size_mb(output_dir))
    sample = sample_predictions(predictions, PREDICTION_TABLE_ROWS) if predictions else []
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            _finish_wandb(tracker.tracker, summary, sample, output_dir, log_model, metrics, step)
        elif tracker.name == "tensorboard" and sample:
            tracker.log({"predictions": _predictions_markdown(sample[:TENSORBOARD_TEXT_ROWS])}, step=step)


def _finish_wandb(
    run: Any,
    summary: Mapping[str, Any],
    sample: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    log_model: bool,
    metrics: Mapping[str, Any],
    step: int | None,
) -> None:
    import wandb

    if sample:
        columns = ["id", "dialogue", "reference", "prediction", "rougeL"]
        table = wandb.Table(columns=columns, data=[[row.get(c, "") for c in columns] for row in sample])
        run.log({"predictions": table}, step=step)
    run.summary.update(dict(summary))
    if log_model:
        method = str(metrics.get("method", "model"))
        artifact = wandb.Artifact(
            name=_artifact_name(f"{run.name or run.id}-{method}"),
            type="model",
            description=f"dialogsum {method} fine-tune of {metrics.get('model_name_or_path', '?')}",
            metadata={k: v for k, v in summary.items() if is_number(v) or isinstance(v, str)},
        )
        for path in sorted(Path(output_dir).iterdir()):
            if path.is_file() and path.name not in _NOT_IN_ARTIFACT:
                artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=["latest", method])
