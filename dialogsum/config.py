"""Typed run configuration: the single source of defaults, parsed from CLI flags and/or a YAML file.

Every field has a one-line ``help`` that becomes ``--help``. Flags follow the Hugging Face example scripts
(``--model_name_or_path``, ``--per_device_train_batch_size``, ...). ``--config file.yaml`` takes the same keys;
flags given on the command line win over the file. Everything is validated here, before any model or data is
loaded: a bad value is one ``ConfigError`` line and exit code 2.

Precision and topology (mixed precision, number of processes, DeepSpeed/FSDP) belong to the accelerate config
(``accelerate_configs/*.yaml``), not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dialogsum.errors import ConfigError

#: The prompt of the reference lab, kept byte for byte so zero-shot numbers are comparable.
LAB_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "

#: Learning rates used when ``--learning_rate`` is not given. The lab used 1e-5 for full fine-tuning, which
#: barely moves flan-t5-base in one epoch; 5e-5 is the Hugging Face summarization example's default and
#: converges in one epoch on DialogSum. LoRA uses the lab's 1e-3 (adapters start at zero and need a large lr).
DEFAULT_LEARNING_RATE = {"full": 5e-5, "lora": 1e-3}

METHODS = ("full", "lora")
REPORT_TO_CHOICES = ("all", "wandb", "tensorboard", "none")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
BEST_METRICS = ("eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum")


#: Defaults applied by ``--quickstart`` (anything given explicitly still wins): a tiny model learns the
#: synthetic data in about a minute on 2 CPU cores.
QUICKSTART_DEFAULTS: dict[str, dict[str, Any]] = {
    "common": {
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "max_source_length": 96,
        "max_target_length": 32,
        "max_new_tokens": 32,
        "logging_steps": 10,
        "report_to": "tensorboard",
        "warmup_ratio": 0.05,
    },
    "full": {"num_train_epochs": 6.0, "learning_rate": 3e-3},
    "lora": {"num_train_epochs": 6.0, "learning_rate": 1e-2, "lora_target_modules": ["q", "k", "v", "o"]},
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelArguments:
    """Which model and tokenizer to start from."""

    model_name_or_path: str = _help(
        "Hub id or local directory of a seq2seq model (config + tokenizer, weights if any).",
        default="google/flan-t5-base",
    )
    tokenizer_name: str | None = _help("Tokenizer hub id or directory, if not the model's own.", default=None)
    adapter_path: str | None = _help(
        "Directory of a trained PEFT LoRA adapter to load on top of the model (evaluation/inference).",
        default=None,
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: less memory, ~30% more compute.", default=False
    )


@dataclass
class DataArguments:
    """Where the dialogues come from and how they become model inputs."""

    dataset_name: str | None = _help(
        "Hub dataset id (or a directory saved with save_to_disk). Ignored when any --*_file is given.",
        default="knkarthick/dialogsum",
    )
    dataset_config_name: str | None = _help("Dataset configuration name on the hub, if any.", default=None)
    train_file: str | None = _help("Local training file (.jsonl, .json, .csv or .parquet).", default=None)
    validation_file: str | None = _help("Local validation file (.jsonl, .json, .csv or .parquet).", default=None)
    test_file: str | None = _help(
        "Local test file; may hold several references as summary1, summary2, ... columns.", default=None
    )
    text_column: str = _help("Column with the dialogue text.", default="dialogue")
    summary_column: str = _help("Column with the reference summary.", default="summary")
    id_column: str = _help("Column with an example id (row number is used when absent).", default="fname")
    prompt_template: str = _help(
        "Prompt around each dialogue; must contain {dialogue}. Default: the lab's prompt.", default=LAB_PROMPT
    )
    max_source_length: int = _help("Max prompt tokens; longer prompts are truncated (and counted).", default=512)
    max_target_length: int = _help("Max summary tokens for training labels (longer are truncated).", default=128)
    max_train_samples: int | None = _help("Use only the first N training rows (debugging/lab subsample).", default=None)
    max_eval_samples: int | None = _help("Use only the first N validation rows.", default=None)
    max_test_samples: int | None = _help("Use only the first N test dialogues.", default=None)
    subsample_every: int | None = _help(
        "Keep only rows whose index is a multiple of N, before the limits above (the lab used 100: "
        "12,460/500/1,500 rows -> 125/5/15).",
        default=None,
    )
    group_by_length: bool = _help(
        "Batch training examples of similar length (seeded, random batch order): far less padding.", default=True
    )
    strict: bool = _help("Refuse rows with an empty dialogue/summary instead of skipping them.", default=False)


@dataclass
class TrainingArguments:
    """The optimisation loop, checkpoints and outputs."""

    output_dir: str | None = _help(
        "Where the model/adapter, metrics.json, predictions.jsonl and reports go (SM_MODEL_DIR on SageMaker).",
        default=None,
    )
    overwrite_output_dir: bool = _help("Allow writing into a non-empty --output_dir.", default=False)
    quickstart: bool = _help(
        "Offline demo: build a tiny random T5, a tokenizer and a synthetic dataset under "
        "<output_dir>/quickstart_assets and train on them (no download, ~1 minute on 2 CPU cores).",
        default=False,
    )
    per_device_train_batch_size: int = _help("Training batch size per process.", default=8)
    per_device_eval_batch_size: int = _help("Evaluation/generation batch size per process.", default=16)
    gradient_accumulation_steps: int = _help("Micro-batches accumulated per optimizer step.", default=1)
    learning_rate: float | None = _help(
        "Peak learning rate. Default: 5e-5 for full fine-tuning, 1e-3 for LoRA.", default=None
    )
    weight_decay: float = _help("AdamW weight decay (never applied to biases and LayerNorm weights).", default=0.01)
    num_train_epochs: float = _help("Number of passes over the training data.", default=1.0)
    max_train_steps: int | None = _help("Optimizer steps to run; overrides --num_train_epochs.", default=None)
    lr_scheduler_type: str = _help(f"Learning-rate schedule: one of {', '.join(SCHEDULERS)}.", default="linear")
    num_warmup_steps: int | None = _help("Warm-up optimizer steps (default: --warmup_ratio of the run).", default=None)
    warmup_ratio: float = _help("Fraction of optimizer steps used for linear warm-up.", default=0.0)
    max_grad_norm: float = _help("Clip the global gradient norm to this value (0 disables).", default=1.0)
    logging_steps: int = _help("Log loss, lr, grad norm and tokens/s every N optimizer steps.", default=10)
    seed: int = _help("Random seed for initialisation, data order and dropout.", default=42)
    checkpointing_steps: str | None = _help(
        "Save the full training state every N optimizer steps, or 'epoch'.", default=None
    )
    save_total_limit: int | None = _help("Keep only the newest K checkpoints (plus the best one).", default=None)
    resume_from_checkpoint: str | None = _help(
        "Checkpoint directory to resume from, or 'latest' for the newest complete one in --output_dir.",
        default=None,
    )
    eval_steps: int | None = _help("Evaluate on the validation split every N optimizer steps.", default=None)
    eval_with_generation: bool = _help(
        "During training evaluations, also generate and compute ROUGE (slower than loss alone).", default=False
    )
    metric_for_best: str = _help(
        f"Metric that selects the best checkpoint: {', '.join(BEST_METRICS)}.", default="eval_loss"
    )
    early_stopping_patience: int | None = _help(
        "Stop after this many evaluations without improvement of --metric_for_best.", default=None
    )
    do_train: bool = _help("Run training (set False to only evaluate the starting model).", default=True)
    do_eval: bool = _help("After training, generate on --eval_split and compute ROUGE.", default=True)
    eval_split: str = _help("Split used for the final evaluation: test or validation.", default="test")


@dataclass
class LoraArguments:
    """LoRA adapter settings (used by train_lora.py). Defaults are the lab's."""

    lora_r: int = _help("LoRA rank.", default=32)
    lora_alpha: int = _help("LoRA scaling numerator (scale = alpha / r).", default=32)
    lora_dropout: float = _help("Dropout on the LoRA branch.", default=0.05)
    lora_target_modules: list[str] = _help(
        "Module names to adapt (T5 attention: q k v o).", default_factory=lambda: ["q", "v"]
    )


@dataclass
class GenerationArguments:
    """Generation used for evaluation and summarization; saved with every result."""

    max_new_tokens: int = _help("Maximum summary tokens to generate (never the silent 20-token cap).", default=128)
    num_beams: int = _help("Beam search width (1 = greedy, as in the lab).", default=1)
    length_penalty: float = _help("Beam search length penalty.", default=1.0)
    no_repeat_ngram_size: int = _help("Forbid repeating n-grams of this size (0 = off).", default=0)


@dataclass
class TrackingArguments:
    """Experiment tracking (W&B, TensorBoard)."""

    report_to: str = _help(
        "Trackers: all (wandb + tensorboard), wandb, tensorboard or none. W&B honours WANDB_MODE.",
        default="all",
    )
    run_name: str | None = _help("Run name shown in W&B/TensorBoard (default: method + time).", default=None)
    wandb_project: str = _help("W&B project.", default="dialogsum")
    wandb_group: str | None = _help("W&B group (e.g. one per experiment sweep).", default=None)
    wandb_tags: list[str] = _help("W&B tags.", default_factory=list)
    log_model: bool = _help("Upload the final model/adapter to W&B as an artifact.", default=False)


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "train": TrainingArguments,
    "lora": LoraArguments,
    "gen": GenerationArguments,
    "track": TrackingArguments,
}


@dataclass
class Config:
    """A resolved run configuration: one dataclass per concern plus the method (``full`` or ``lora``)."""

    method: str
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)
    lora: LoraArguments = field(default_factory=LoraArguments)
    gen: GenerationArguments = field(default_factory=GenerationArguments)
    track: TrackingArguments = field(default_factory=TrackingArguments)

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{flag: value}`` dict (plus ``method``); can be fed back with ``--config``."""
        flat: dict[str, Any] = {"method": self.method}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (same keys as the flags)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @property
    def learning_rate(self) -> float:
        """The learning rate in force (explicit or the method's default)."""
        if self.train.learning_rate is not None:
            return self.train.learning_rate
        return DEFAULT_LEARNING_RATE[self.method]


def field_names() -> dict[str, str]:
    """Map every flag name to its section name."""
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (plus a hint) and exits with code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def _str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _none_or(kind: type) -> Any:
    def convert(value: str) -> Any:
        if value.lower() in ("none", "null"):
            return None
        return kind(value)

    convert.__name__ = kind.__name__
    return convert


def build_parser(
    description: str = "", flags: dict[type, tuple[str, ...] | None] | None = None, config_file: bool = True
) -> argparse.ArgumentParser:
    """Build the argparse parser for the config fields, grouped by section.

    ``flags`` limits it to some sections and fields (``{DataArguments: ("test_file",), GenerationArguments:
    None}``: None = every field of that section), for scripts that take only part of the configuration.
    ``config_file`` adds ``--config file.yaml``.
    """
    # allow_abbrev=False: a mistyped flag (--learning_rat) is an error, not silently taken for another flag
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    if config_file:
        parser.add_argument("--config", default=None, help="YAML file with any of the flags below as keys.")
    selected = flags if flags is not None else dict.fromkeys(SECTIONS.values())
    for section, cls in SECTIONS.items():
        if cls not in selected:
            continue
        names = selected[cls]
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if names is not None and f.name not in names:
                continue
            hint = str(hints[f.name])
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = repr(default) if isinstance(default, str) and "\n" in default else default
            text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")
            kwargs: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
            if hint.startswith("bool"):
                kwargs.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
            elif hint.startswith("list"):
                kwargs.update(nargs="*", type=str)
            elif hint.startswith("int"):
                kwargs.update(type=_none_or(int) if "None" in hint else int)
            elif hint.startswith("float"):
                kwargs.update(type=_none_or(float) if "None" in hint else float)
            else:
                kwargs.update(type=_none_or(str) if "None" in hint else str)
            group.add_argument(f"--{f.name}", **kwargs)
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values")
    known = field_names()
    unknown = sorted(k for k in data if k not in known and k != "method")
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    return data


def _sagemaker_defaults() -> dict[str, Any]:
    """On SageMaker, its standard environment variables supply output and data paths."""
    defaults: dict[str, Any] = {}
    if os.environ.get("SM_MODEL_DIR"):
        defaults["output_dir"] = os.environ["SM_MODEL_DIR"]
    for channel, key in (("TRAIN", "train_file"), ("VALIDATION", "validation_file"), ("TEST", "test_file")):
        directory = os.environ.get(f"SM_CHANNEL_{channel}")
        if directory:
            files = sorted(p for p in Path(directory).glob("*") if p.suffix in (".jsonl", ".json", ".csv", ".parquet"))
            if files:
                defaults[key] = str(files[0])
    return defaults


def parse_config(argv: Sequence[str] | None, method: str, description: str = "") -> Config:
    """Parse flags (and ``--config`` YAML) into a validated :class:`Config` for ``method``.

    Precedence: command line > YAML file > SageMaker environment > dataclass defaults.
    Raises :class:`ConfigError` (exit code 2) on any invalid value.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    parser = build_parser(description)
    args = vars(parser.parse_args(list(argv) if argv is not None else None))
    values: dict[str, Any] = dict(_sagemaker_defaults())
    config_path = args.pop("config", None)
    if config_path:
        file_values = _load_yaml(config_path)
        file_method = file_values.pop("method", None)
        if file_method is not None and file_method != method:
            raise ConfigError(f"--config {config_path} is for method {file_method!r}, this script trains {method!r}")
        values.update(file_values)
    values.update(args)
    if values.get("quickstart"):
        values = {**QUICKSTART_DEFAULTS["common"], **QUICKSTART_DEFAULTS[method], **values}
    return build_config(method, values)


def build_config(method: str, values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a flat ``{flag: value}`` dict."""
    known = field_names()
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        per_section[known[key]][key] = value
    try:
        sections = {name: SECTIONS[name](**kw) for name, kw in per_section.items()}
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
    cfg = Config(method=method, **sections)
    validate(cfg)
    return cfg


def _positive(name: str, value: float | None, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"--{name} is required")
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--{name} must be {bound}, got {value}")


def validate(cfg: Config) -> None:
    """Check every value; raise :class:`ConfigError` naming the first bad flag."""
    d, t, lo, g, tr = cfg.data, cfg.train, cfg.lora, cfg.gen, cfg.track
    if not cfg.model.model_name_or_path and not t.quickstart:
        raise ConfigError("--model_name_or_path must not be empty")
    if t.output_dir is None or not str(t.output_dir).strip():
        raise ConfigError("--output_dir is required (where the model, metrics and predictions are written)")
    if "{dialogue}" not in d.prompt_template:
        raise ConfigError("--prompt_template must contain the placeholder {dialogue}")
    try:
        d.prompt_template.format(dialogue="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"--prompt_template has a bad placeholder: {exc}") from exc
    for name in ("max_source_length", "max_target_length"):
        _positive(name, getattr(d, name), allow_none=False)
    for name in ("max_train_samples", "max_eval_samples", "max_test_samples", "subsample_every"):
        _positive(name, getattr(d, name))
    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    ):
        _positive(name, getattr(t, name), allow_none=False)
    if t.learning_rate is not None and not (0 < t.learning_rate < 1):
        raise ConfigError(f"--learning_rate must be in (0, 1), got {t.learning_rate}")
    _positive("weight_decay", t.weight_decay, allow_zero=True)
    _positive("num_train_epochs", t.num_train_epochs, allow_none=False)
    _positive("max_train_steps", t.max_train_steps)
    _positive("num_warmup_steps", t.num_warmup_steps, allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    _positive("max_grad_norm", t.max_grad_norm, allow_zero=True)
    if t.lr_scheduler_type not in SCHEDULERS:
        raise ConfigError(f"--lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {t.lr_scheduler_type!r}")
    if t.checkpointing_steps is not None and t.checkpointing_steps != "epoch":
        if not str(t.checkpointing_steps).isdigit() or int(t.checkpointing_steps) <= 0:
            raise ConfigError(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {t.checkpointing_steps!r}"
            )
    _positive("save_total_limit", t.save_total_limit)
    _positive("eval_steps", t.eval_steps)
    _positive("early_stopping_patience", t.early_stopping_patience)
    if t.metric_for_best not in BEST_METRICS:
        raise ConfigError(f"--metric_for_best must be one of {', '.join(BEST_METRICS)}, got {t.metric_for_best!r}")
    if t.metric_for_best != "eval_loss" and t.eval_steps and not t.eval_with_generation:
        raise ConfigError(f"--metric_for_best {t.metric_for_best} needs --eval_with_generation (ROUGE during training)")
    if t.early_stopping_patience is not None and not t.eval_steps:
        raise ConfigError("--early_stopping_patience needs --eval_steps")
    if t.eval_split not in ("test", "validation"):
        raise ConfigError(f"--eval_split must be test or validation, got {t.eval_split!r}")
    _positive("lora_r", lo.lora_r, allow_none=False)
    _positive("lora_alpha", lo.lora_alpha, allow_none=False)
    if not 0 <= lo.lora_dropout < 1:
        raise ConfigError(f"--lora_dropout must be in [0, 1), got {lo.lora_dropout}")
    if not lo.lora_target_modules:
        raise ConfigError("--lora_target_modules needs at least one module name (e.g. q v)")
    _positive("max_new_tokens", g.max_new_tokens, allow_none=False)
    _positive("num_beams", g.num_beams, allow_none=False)
    _positive("no_repeat_ngram_size", g.no_repeat_ngram_size, allow_zero=True)
    if tr.report_to not in REPORT_TO_CHOICES:
        raise ConfigError(f"--report_to must be one of {', '.join(REPORT_TO_CHOICES)}, got {tr.report_to!r}")


def config_to_json(cfg: Config) -> str:
    """The resolved config as pretty JSON (for logs and metrics files)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=False)
