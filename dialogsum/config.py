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
import ast
import dataclasses
import logging
import math
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from dialogsum.command import SECRET_FIELDS, command_line
from dialogsum.errors import ConfigError, UserError
from dialogsum.files import name_length_problem, read_text, write_text
from dialogsum.formatting import printable, shorten
from dialogsum.preemption import EXIT_STOPPED, parse_duration
from dialogsum.process import is_main_launch_process
from dialogsum.sagemaker import check_sagemaker_channels, sagemaker_defaults

logger = logging.getLogger(__name__)

#: The prompt of the reference lab, kept byte for byte so zero-shot numbers are comparable.
LAB_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "

#: Learning rates used when ``--learning_rate`` is not given. The lab used 1e-5 for full fine-tuning, which
#: barely moves flan-t5-base in one epoch; 5e-5 is the Hugging Face summarization example's default and
#: converges in one epoch on DialogSum. LoRA uses the lab's 1e-3 (adapters start at zero and need a large lr).
#: IA3 uses 3e-3, the (IA)^3 paper's (T-Few) learning rate: its scaling vectors start at one.
DEFAULT_LEARNING_RATE = {"full": 5e-5, "lora": 1e-3, "ia3": 3e-3}

METHODS = ("full", "lora", "ia3")
#: Methods that train a peft adapter (saved as adapter_model.safetensors + adapter_config.json).
ADAPTER_METHODS = ("lora", "ia3")
#: --init_lora_weights values this project passes to peft (``pissa_niter_N``: N from 0 to 1000). ``pissa``,
#: ``pissa_niter_N`` and ``olora`` rewrite the base weights at initialisation (see docs/training.md).
LORA_INITS = ("true", "false", "gaussian", "pissa", "pissa_niter_N", "olora", "orthogonal")
#: The most subspace iterations ``pissa_niter_N`` may ask for (more only costs start-up time).
PISSA_NITER_MAX = 1000
#: --init_lora_weights values peft offers that need more than a model (refused, with the reason).
LORA_INITS_REFUSED = {
    "eva": "a pass over training activations before training (peft's initialize_lora_eva_weights)",
    "corda": "a preprocessing pass over data (peft's preprocess_corda)",
    "loftq": "a quantized base model (LoftQ initialises against the quantization error)",
    "mica": "support this project does not have yet (MiCA freezes B; its saving and resuming are untested here)",
}
# Choices are Literal types: HfArgumentParser turns them into the flags' choices, and validate() checks them for
# settings that come from elsewhere (YAML, build_config), both with one message (see _choice_error).
LengthBuckets = Literal["auto", "on", "off"]
ReportTo = Literal["all", "wandb", "tensorboard", "none"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw", "adafactor"]
EvalSplit = Literal["test", "validation"]
BestMetric = Literal["eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum"]
LENGTH_BUCKET_CHOICES = typing.get_args(LengthBuckets)
REPORT_TO_CHOICES = typing.get_args(ReportTo)
SCHEDULERS = typing.get_args(Scheduler)
OPTIMIZERS = typing.get_args(Optimizer)
#: The learning rate of --optim adafactor when --learning_rate is not given: T5's usual fine-tuning setting
#: (a fixed lr, relative step off), for full fine-tuning and LoRA alike.
ADAFACTOR_LEARNING_RATE = 1e-3
BEST_METRICS = typing.get_args(BestMetric)
#: The largest seed: numpy (seeded by accelerate's set_seed with the same value) takes 32-bit seeds only.
MAX_SEED = 2**32 - 1


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
    "ia3": {"num_train_epochs": 6.0, "learning_rate": 1e-1},
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


_UNSET = object()


def _resume_help(text: str, older_checkpoints: Any = _UNSET, **kwargs: Any) -> Any:
    """A setting a resumed run must share with its checkpoint (else it is not the same run: the checkpoint's
    optimizer, scheduler or data position would silently override or contradict it). ``older_checkpoints``: the
    value of a setting added later, for checkpoints written before it existed."""
    metadata: dict[str, Any] = {"help": text, "resume": True}
    if older_checkpoints is not _UNSET:
        metadata["older_checkpoints"] = older_checkpoints
    return field(metadata=metadata, **kwargs)


@dataclass
class ModelArguments:
    """Which model and tokenizer to start from."""

    model_name_or_path: str = _resume_help(
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

    dataset_name: str | None = _resume_help(
        "Hub dataset id (or a directory saved with save_to_disk). Ignored when any --*_file is given.",
        default="knkarthick/dialogsum",
    )
    dataset_config_name: str | None = _help("Dataset configuration name on the hub, if any.", default=None)
    train_file: str | None = _resume_help("Local training file (.jsonl, .json, .csv or .parquet).", default=None)
    validation_file: str | None = _help("Local validation file (.jsonl, .json, .csv or .parquet).", default=None)
    test_file: str | None = _help(
        "Local test file; may hold several references as summary1, summary2, ... columns.", default=None
    )
    text_column: str = _resume_help("Column with the dialogue text.", default="dialogue")
    summary_column: str = _resume_help("Column with the reference summary.", default="summary")
    id_column: str = _help("Column with an example id (row number is used when absent).", default="fname")
    prompt_template: str = _resume_help(
        "Prompt around each dialogue; must contain {dialogue}. Default: the lab's prompt.", default=LAB_PROMPT
    )
    max_source_length: int = _resume_help("Max prompt tokens; longer prompts are truncated (and counted).", default=512)
    max_target_length: int = _resume_help("Max summary tokens for training labels (longer are truncated).", default=128)
    max_train_samples: int | None = _resume_help(
        "Use only the first N training rows (debugging/lab subsample).", default=None
    )
    max_eval_samples: int | None = _help("Use only the first N validation rows.", default=None)
    max_test_samples: int | None = _help("Use only the first N test dialogues.", default=None)
    subsample_every: int | None = _resume_help(
        "Keep only rows whose index is a multiple of N, before the limits above (the lab used 100: "
        "12,460/500/1,500 rows -> 125/5/15).",
        default=None,
    )
    group_by_length: bool = _resume_help(
        "Batch training examples of similar length (seeded, random batch order): far less padding.", default=True
    )
    max_tokens_per_batch: int | None = _resume_help(
        "Token-budget training batches: as many (length-grouped) examples as fit N padded tokens, examples x "
        "(prompt width + summary width), instead of --per_device_train_batch_size examples. The batch then "
        "varies in examples: see docs/training.md for the learning rate.",
        default=None,
    )
    length_buckets: LengthBuckets = _help(
        "Pad batches up to a few widths (16, 24, 32, 48, 64, 96, ... up to the max lengths), so that a compiled "
        "model sees a few shapes instead of one per batch: auto (on when the accelerate config compiles, i.e. "
        "sets a dynamo_backend), on or off.",
        default="auto",
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
    per_device_train_batch_size: int = _resume_help("Training batch size per process.", default=8)
    per_device_eval_batch_size: int = _help("Evaluation/generation batch size per process.", default=16)
    gradient_accumulation_steps: int = _resume_help("Micro-batches accumulated per optimizer step.", default=1)
    learning_rate: float | None = _resume_help(
        "Peak learning rate. Default: 5e-5 for full fine-tuning, 1e-3 for LoRA and for --optim adafactor.", default=None
    )
    weight_decay: float = _resume_help("Weight decay (never applied to biases and LayerNorm weights).", default=0.01)
    optim: Optimizer = _resume_help(
        "Optimizer: adamw (torch's fused AdamW) or adafactor (transformers' Adafactor with T5's fine-tuning settings: "
        f"relative step off, no parameter scaling, no momentum; default lr {ADAFACTOR_LEARNING_RATE}). Adafactor keeps "
        "factored second moments instead of Adam's two full-size states (docs/training.md).",
        default="adamw",
        older_checkpoints="adamw",
    )
    label_smoothing_factor: float = _resume_help(
        "Label smoothing of the training loss (0 = none; e.g. 0.1): applied per target token, then token-weighted "
        "like the plain loss. Evaluation loss stays plain cross-entropy.",
        default=0.0,
        older_checkpoints=0.0,
    )
    num_train_epochs: float = _help("Number of passes over the training data.", default=1.0)
    max_train_steps: int | None = _help("Optimizer steps to run; overrides --num_train_epochs.", default=None)
    lr_scheduler_type: Scheduler = _resume_help(
        f"Learning-rate schedule: one of {', '.join(SCHEDULERS)}.", default="linear"
    )
    num_warmup_steps: int | None = _help("Warm-up optimizer steps (default: --warmup_ratio of the run).", default=None)
    warmup_ratio: float = _help("Fraction of optimizer steps used for linear warm-up.", default=0.0)
    max_grad_norm: float = _help("Clip the global gradient norm to this value (0 disables).", default=1.0)
    logging_steps: int = _help("Log loss, lr, grad norm and tokens/s every N optimizer steps.", default=10)
    seed: int = _resume_help("Random seed for initialisation, data order and dropout.", default=42)
    checkpointing_steps: str | None = _help(
        "Save the full training state every N optimizer steps, or 'epoch'.", default=None
    )
    save_total_limit: int | None = _help("Keep only the newest K checkpoints (plus the best one).", default=None)
    resume_from_checkpoint: str | None = _help(
        "Checkpoint directory to resume from, or 'latest' for the newest complete one in --checkpoint_dir.",
        default=None,
    )
    checkpoint_dir: str | None = _help(
        "Where checkpoints go and where 'latest' looks (default: --output_dir; on SageMaker /opt/ml/checkpoints, "
        "which SageMaker syncs to checkpoint_s3_uri and restores on a spot restart).",
        default=None,
    )
    max_time: str | None = _help(
        "Wall-clock budget of this process, in seconds or HH:MM:SS: training stops with a checkpoint before it "
        f"runs out (exit code {EXIT_STOPPED}; continue with --resume_from_checkpoint latest).",
        default=None,
    )
    ddp_timeout: int = _help(
        "Seconds a process waits for the others at a collective (gradient all-reduce, checkpoint barrier, "
        "evaluation gather) before the job ends with an error naming the step and the process that did not "
        "arrive. Keep it above the longest time one process can work while another waits (the HF Trainer's flag).",
        default=1800,
    )
    eval_steps: int | None = _help("Evaluate on the validation split every N optimizer steps.", default=None)
    eval_with_generation: bool = _help(
        "During training evaluations, also generate and compute ROUGE (slower than loss alone).", default=False
    )
    metric_for_best: BestMetric = _help(
        f"Metric that selects the best checkpoint: {', '.join(BEST_METRICS)}.", default="eval_loss"
    )
    early_stopping_patience: int | None = _help(
        "Stop after this many evaluations without improvement of --metric_for_best.", default=None
    )
    load_best_model_at_end: bool = _help(
        "Save (and evaluate) the best checkpoint by --metric_for_best as the final model instead of the last step's; "
        "needs --eval_steps and --checkpointing_steps.",
        default=False,
    )
    do_train: bool = _help("Run training (set False to only evaluate the starting model).", default=True)
    do_eval: bool = _help("After training, generate on --eval_split and compute ROUGE.", default=True)
    eval_split: EvalSplit = _help("Split used for the final evaluation: test or validation.", default="test")


@dataclass
class LoraArguments:
    """LoRA adapter settings (used by train_lora.py). Defaults are the lab's."""

    lora_r: int = _resume_help("LoRA rank.", default=32)
    lora_alpha: int = _resume_help("LoRA scaling numerator (scale = alpha / r).", default=32)
    lora_dropout: float = _resume_help("Dropout on the LoRA branch.", default=0.05)
    lora_target_modules: list[str] = _resume_help(
        "Module names to adapt (T5 attention: q k v o; feed-forward: wi_0 wi_1 wo on gated FLAN-T5, wi wo on the "
        "original T5), or all-linear (every linear layer but the output head: on FLAN-T5 q k v o wi_0 wi_1 wo).",
        default_factory=lambda: ["q", "v"],
    )
    use_dora: bool = _resume_help(
        "DoRA (peft use_dora): a trained magnitude per output feature on top of the LoRA direction update.",
        default=False,
        older_checkpoints=False,
    )
    use_rslora: bool = _resume_help(
        "rsLoRA (peft use_rslora): scale the update by alpha / sqrt(r) instead of alpha / r.",
        default=False,
        older_checkpoints=False,
    )
    init_lora_weights: str = _resume_help(
        f"LoRA initialisation (peft init_lora_weights): {', '.join(LORA_INITS)}. pissa and olora start from the "
        "base weights' principal directions and change the base weights; their adapter is saved converted to plain "
        "LoRA (rank 2r) against the original base model.",
        default="true",
        older_checkpoints="true",
    )
    loraplus_lr_ratio: float | None = _resume_help(
        "LoRA+ (peft create_loraplus_optimizer): the B matrices learn at --learning_rate x this ratio (e.g. 16).",
        default=None,
        older_checkpoints=None,
    )
    merge_lora: bool = _help(
        "After training, also write a standalone model with the adapter (LoRA or IA3) merged in to "
        "<output_dir>/merged (loads with AutoModelForSeq2SeqLM, no peft needed; as scripts/export.py does).",
        default=False,
    )


@dataclass
class IA3Arguments:
    """(IA)^3 adapter settings (used by train_ia3.py). Defaults are peft's for T5."""

    ia3_target_modules: list[str] = _resume_help(
        "Module names whose activations get a learned scale (T5: k v of attention, wo of the feed-forward).",
        default_factory=lambda: ["k", "v", "wo"],
    )
    ia3_feedforward_modules: list[str] = _resume_help(
        "The feed-forward ones among --ia3_target_modules (scaled on their input, not their output).",
        default_factory=lambda: ["wo"],
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

    report_to: ReportTo = _help(
        "Trackers: all (wandb + tensorboard), wandb, tensorboard or none. W&B honours WANDB_MODE.",
        default="all",
    )
    run_name: str | None = _help(
        "Run name shown in W&B/TensorBoard (default: $WANDB_NAME, else method + time).", default=None
    )
    wandb_project: str | None = _help("W&B project (default: $WANDB_PROJECT, else dialogsum).", default=None)
    wandb_entity: str | None = _help("W&B team or user (default: $WANDB_ENTITY, else your default).", default=None)
    wandb_group: str | None = _help(
        "W&B group, e.g. one per experiment or sweep (default: $WANDB_RUN_GROUP).", default=None
    )
    wandb_tags: list[str] = _help("W&B tags (default: $WANDB_TAGS, comma-separated).", default_factory=list)
    log_model: bool = _help("Upload the final model/adapter to W&B as an artifact.", default=False)


@dataclass
class HubArguments:
    """Publishing to the Hugging Face Hub (checked before training starts)."""

    push_to_hub: bool = _help(
        "At the end, upload the model or adapter, tokenizer, generation config, card, metrics, report and plots "
        "(never checkpoints) to the hub.",
        default=False,
    )
    hub_model_id: str | None = _help(
        "Hub repository, 'user/name' or 'org/name' (default: the --output_dir folder name in your namespace).",
        default=None,
    )
    hub_private_repo: bool = _help("Create the hub repository as private.", default=False)
    hub_token: str | None = _help(
        "Hub token with write access (default: $HF_TOKEN, else the `hf auth login` token). Never saved.",
        default=None,
    )


#: Settings that name files or folders (their names must fit the filesystem).
PATH_FIELDS = (
    "model_name_or_path",
    "tokenizer_name",
    "adapter_path",
    "dataset_name",
    "train_file",
    "validation_file",
    "test_file",
    "output_dir",
    "checkpoint_dir",
    "resume_from_checkpoint",
)


#: Flags of the Hugging Face example scripts that have another name here: old -> (new, hint).
RENAMED_FLAGS = {
    "--source_prefix": ("--prompt_template", "a template around the dialogue, e.g. 'summarize: {dialogue}'"),
    "--val_max_target_length": ("--max_new_tokens", "the summary length generated for evaluation"),
    "--with_tracking": ("--report_to", "all, wandb, tensorboard or none"),
}


def renamed_flag_hint(names: Sequence[str]) -> str:
    """``; --source_prefix is --prompt_template here (...)`` for every renamed HF example flag in ``names``."""
    found = []
    for name in names:
        flag = "--" + str(name).lstrip("-").split("=", 1)[0]
        if flag in RENAMED_FLAGS and flag not in [f for f, _ in found]:
            found.append((flag, RENAMED_FLAGS[flag]))
    return "".join(f"; {old} is {new} here ({hint})" for old, (new, hint) in found)


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "train": TrainingArguments,
    "lora": LoraArguments,
    "ia3": IA3Arguments,
    "gen": GenerationArguments,
    "track": TrackingArguments,
    "hub": HubArguments,
}


class _ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, except that text holding U+0085, U+2028 or U+2029 is written double-quoted (escaped):
    in its plain or single-quoted style PyYAML writes them raw, and reading folds U+0085 into a space."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = '"' if any(c in text for c in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ConfigDumper.add_representer(str, _represent_text)


@dataclass
class Config:
    """A resolved run configuration: one dataclass per concern plus the method (``full`` or ``lora``)."""

    method: str
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)
    lora: LoraArguments = field(default_factory=LoraArguments)
    ia3: IA3Arguments = field(default_factory=IA3Arguments)
    gen: GenerationArguments = field(default_factory=GenerationArguments)
    track: TrackingArguments = field(default_factory=TrackingArguments)
    hub: HubArguments = field(default_factory=HubArguments)
    command: str | None = field(default=None, compare=False)
    """The command line that started the run (secrets masked), for metrics.json; not a setting."""
    config_file: str | None = field(default=None, compare=False)
    """The ``--config`` file the settings came from (an input: never written over); not a setting."""

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{flag: value}`` dict (plus ``method``; secrets left out); can be fed back with ``--config``."""
        flat: dict[str, Any] = {"method": self.method}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        for secret in SECRET_FIELDS:
            flat.pop(secret, None)
        return flat

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (same keys as the flags), atomically."""
        write_text(path, yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True))

    @property
    def learning_rate(self) -> float:
        """The learning rate in force (explicit or the method's default)."""
        if self.train.learning_rate is not None:
            return self.train.learning_rate
        if self.train.optim == "adafactor":
            return ADAFACTOR_LEARNING_RATE
        return DEFAULT_LEARNING_RATE[self.method]


#: The section of each method's own settings (a resume compares only the running method's).
METHOD_SECTIONS: dict[str, type] = {"lora": LoraArguments, "ia3": IA3Arguments}


def resume_settings(method: str) -> tuple[str, ...]:
    """The settings a run resuming with ``method`` must share with its checkpoint: ``method`` and every field
    marked with :func:`_resume_help` (another method's own settings left out), in declaration order."""
    names = ["method"]
    for section in SECTIONS.values():
        if section in METHOD_SECTIONS.values() and section is not METHOD_SECTIONS.get(method):
            continue
        names += [f.name for f in dataclasses.fields(section) if f.metadata.get("resume")]
    return tuple(names)


def older_checkpoint_values() -> dict[str, Any]:
    """For resume settings added after checkpoints were first written: the value such a checkpoint was made with."""
    return {
        f.name: f.metadata["older_checkpoints"]
        for section in SECTIONS.values()
        for f in dataclasses.fields(section)
        if "older_checkpoints" in f.metadata
    }


def field_names() -> dict[str, str]:
    """Map every flag name to its section name."""
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------- parsing
# transformers' HfArgumentParser turns the dataclasses into flags (types, Optional, lists, booleans with their
# --no_ form, help). Kept here: the YAML layer (its parse_yaml_file/parse_dict put file values into the
# dataclasses as YAML typed them, unparsed, and cannot merge a file with the command line), one-line errors,
# validation across fields, and the subsets of flags that evaluate.py and summarize.py take.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a multi-line default (the prompt) as one quoted line; '%' in help is text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace("%", "%%")
        if (
            action.default is argparse.SUPPRESS
            or not action.option_strings
            or action.option_strings[0].startswith("--no_")
        ):
            return text
        default = action.default
        shown = repr(default) if isinstance(default, str) and "\n" in default else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


#: Field metadata of the project's own (HfArgumentParser hands every other key to ``add_argument``).
_OWN_METADATA = ("resume", "older_checkpoints")


def _flag_metadata(f: dataclasses.Field) -> dict[str, Any]:
    return {k: v for k, v in f.metadata.items() if k not in _OWN_METADATA}


def _flag_class(section: str, cls: type, names: tuple[str, ...] | None) -> type:
    """A copy of a config dataclass (only the fields ``names``, all when None) for HfArgumentParser.

    A copy, because HfArgumentParser rewrites the field types of the classes it is given; its group name is the
    section's.
    """
    hints = typing.get_type_hints(cls)
    fields = [
        (f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory, metadata=_flag_metadata(f)))
        for f in dataclasses.fields(cls)
        if names is None or f.name in names
    ]
    doc = (cls.__doc__ or "").strip().rstrip(".")
    return dataclasses.make_dataclass(
        cls.__name__, fields, namespace={"_argument_group_name": f"{section}: {doc}" if doc else section}
    )


def build_parser(
    description: str = "", flags: dict[type, tuple[str, ...] | None] | None = None, config_file: bool = True
) -> argparse.ArgumentParser:
    """The flags of the config fields (``transformers.HfArgumentParser``), grouped by section.

    ``flags`` limits it to some sections and fields (``{DataArguments: ("test_file",), GenerationArguments:
    None}``: None = every field of that section), for scripts that take only part of the configuration.
    ``config_file`` adds ``--config file.yaml``. A bad flag raises :class:`ConfigError` (one line, exit code 2).
    """
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        """HfArgumentParser that keeps the actions of the flags it adds (argparse lists them only in a private
        attribute), including those added to the sections' argument groups."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.flag_actions: list[argparse.Action] = []
            super().__init__(*args, **kwargs)

        def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
            action = super().add_argument(*args, **kwargs)
            self.flag_actions.append(action)
            return action

        def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
            group = super().add_argument_group(*args, **kwargs)
            add, actions = group.add_argument, self.flag_actions

            def add_and_keep(*a: Any, **kw: Any) -> argparse.Action:
                action = add(*a, **kw)
                actions.append(action)
                return action

            group.add_argument = add_and_keep
            return group

        def error(self, message: str) -> NoReturn:  # type: ignore[override]
            choice = re.match(r"argument (--\w+)(?:/--[\w-]+)?: invalid choice: ", message)
            action = choice and next((a for a in self.flag_actions if choice.group(1) in a.option_strings), None)
            if choice and action is not None and action.choices:  # said as validate() says it for YAML files
                value: Any = message[choice.end() :].rsplit(" (choose from", 1)[0]
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass
                raise _choice_error(choice.group(1), value, list(action.choices))
            # an HF example flag this project renamed: say its name here; a typed newline stays visible, one line
            hint = renamed_flag_hint(message.replace(":", " ").split())
            raise ConfigError(f"{printable(message)}{hint} (see --help)")

    selected = flags if flags is not None else dict.fromkeys(SECTIONS.values())
    classes = [_flag_class(name, cls, selected[cls]) for name, cls in SECTIONS.items() if cls in selected]
    # allow_abbrev=False: a mistyped flag (--learning_rat) is an error, not silently taken for another flag
    parser = Parser(classes, description=description, formatter_class=_HelpFormatter, allow_abbrev=False)
    if config_file:
        parser.add_argument("--config", default=None, help="YAML file with any of the flags below as keys.")
    return parser


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions of every flag of a parser made by :func:`build_parser` (``--help`` included)."""
    return parser.flag_actions  # type: ignore[attr-defined]


_NOT_GIVEN = object()


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """The flags present on the command line, parsed (defaults left out, so that other layers can fill them)."""
    namespace = argparse.Namespace(
        **{a.dest: _NOT_GIVEN for a in flag_actions(parser) if a.dest not in (argparse.SUPPRESS, "help")}
    )
    parser.parse_args(list(argv) if argv is not None else None, namespace=namespace)
    given = {k: v for k, v in vars(namespace).items() if v is not _NOT_GIVEN}
    for action in flag_actions(parser):
        if action.nargs in ("+", "*") and isinstance(given.get(action.dest), list):
            given[action.dest] = _expand_list_literal(action, given[action.dest])
    return given


def _expand_list_literal(action: argparse.Action, values: list[Any]) -> list[Any]:
    """A list flag given as one ``['q', 'v']`` argument: the items of that list.

    That is how SageMaker passes a list hyperparameter: its training toolkit puts ``str(value)`` of each
    hyperparameter after its flag, so ``{"lora_target_modules": ["q", "v"]}`` arrives as the single argument
    ``['q', 'v']``. The JSON spelling ``["q","v"]`` is read too.
    """
    if len(values) != 1 or not isinstance(values[0], str):
        return values
    text = values[0].strip()
    if not (text.startswith("[") or text.endswith("]")):  # no item of these flags is bracketed
        return values
    flag = action.option_strings[0]
    try:
        items = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ConfigError(
            f"{flag}: cannot read {text} as a list; give the items as separate arguments ({flag} q v), as a "
            "Python or JSON list in one argument (['q', 'v'], as SageMaker passes list hyperparameters), or "
            "as a YAML list in a --config file"
        ) from exc
    if not isinstance(items, (list, tuple)) or any(isinstance(i, (list, tuple, dict, set)) for i in items):
        raise ConfigError(f"{flag}: {text} must be a flat list of values (e.g. ['q', 'v'])")
    convert = action.type or str
    try:
        return [convert(str(item)) for item in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{flag}: invalid item in {text}: {exc}") from exc


def _read_yaml(path: str) -> dict[str, Any]:
    """A ``--config`` file (or pipe) as a mapping of flag names to values; any problem is one ConfigError."""
    try:
        text = read_text(path, "--config file")
    except UserError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except RecursionError as exc:
        raise ConfigError(f"--config {path} is nested too deeply to be a config") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values")
    keys = [k for k in data if not isinstance(k, str)]
    if keys:
        raise ConfigError(
            f"--config {path}: key {keys[0]!r} is not a name; keys are flag names (quote a key that YAML reads as "
            "a number, a boolean or null)"
        )
    return data


def _as_flag_text(value: Any) -> str:
    """A YAML scalar written as it would be typed after its flag."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


_KINDS = {"int": "an integer", "float": "a number", "str": "text"}


def _file_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """One YAML value parsed by its flag's own converter, exactly as the same text on the command line."""
    takes_list = action.nargs in ("+", "*")
    is_bool_flag = action.const is True
    type_name = getattr(action.type, "__name__", "str")
    kind = "true or false" if is_bool_flag else _KINDS.get(type_name, type_name)
    expected = f"{key} expects {'a list of ' + kind + ' values' if takes_list else kind}"

    def parse(item: Any) -> Any:
        if item is None or isinstance(item, (list, dict)):
            shape = "nothing (null)" if item is None else f"a {'list' if isinstance(item, list) else 'mapping'}"
            raise ConfigError(f"{where}: {expected}, got {shape}")
        if isinstance(item, bool) and not is_bool_flag:
            raise ConfigError(f"{where}: {expected}, got {str(item).lower()} (quote it if you mean the text)")
        text = _as_flag_text(item)
        if action.type is None:
            return text
        try:
            return action.type(text)
        except argparse.ArgumentTypeError as exc:  # the message argparse prints for the same flag
            raise ConfigError(f"{where}: {key}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {key}: invalid {type_name} value: {text!r}") from exc

    if value is None and action.default is None:
        return None  # an optional setting left unset (as in a saved config.yaml)
    if takes_list:
        return [parse(item) for item in (value if isinstance(value, list) else [value])]
    return parse(value)


def file_values(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The settings of a ``--config`` YAML file, each parsed and checked like its command-line flag.

    A string for a list flag is a one-element list; numbers written as text (``1e-3``, which YAML reads as a
    string, or ``"5"``) are numbers; a value the flag would refuse (``max_train_steps: 2.7``) is refused here,
    naming the file and the key. ``method`` is passed through for the caller to check.
    """
    data = _read_yaml(path)
    actions = {a.dest: a for a in flag_actions(parser) if a.option_strings and a.option_strings[0] == f"--{a.dest}"}
    unknown = sorted(k for k in data if k not in actions and k != "method")
    if unknown:
        names = ", ".join(k if k.isprintable() else repr(k) for k in unknown)  # a key with a newline stays one line
        known_elsewhere = [k for k in unknown if k in field_names()]
        if known_elsewhere and len(known_elsewhere) == len(unknown):
            raise ConfigError(f"--config {path}: key(s) {names} are not settings of this script")
        hint = renamed_flag_hint(unknown)  # an HF example flag this project renamed
        raise ConfigError(f"--config {path}: unknown key(s) {names}{hint}")
    return {k: (v if k == "method" else _file_value(actions[k], k, v, f"--config {path}")) for k, v in data.items()}


def parse_config(argv: Sequence[str] | None, method: str, description: str = "") -> Config:
    """Parse flags (and ``--config`` YAML) into a validated :class:`Config` for ``method``.

    Precedence: command line > YAML file > ``--quickstart`` presets > SageMaker environment > dataclass defaults.
    Raises :class:`ConfigError` (exit code 2) on any invalid value.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    parser = build_parser(description)
    given = given_flags(parser, argv)
    explicit: dict[str, Any] = {}
    config_path = given.pop("config", None)
    if config_path:
        explicit = file_values(parser, config_path)
        file_method = explicit.pop("method", None)
        if file_method is not None and file_method != method:
            raise ConfigError(f"--config {config_path} is for method {file_method!r}, this script trains {method!r}")
    explicit.update(given)
    values: dict[str, Any] = sagemaker_defaults(explicit)
    if explicit.get("overwrite_output_dir") or explicit.get("resume_from_checkpoint") == "":
        values.pop("resume_from_checkpoint", None)  # asked to start afresh: not SageMaker's default 'latest'
    if explicit.get("quickstart"):
        values.update({**QUICKSTART_DEFAULTS["common"], **QUICKSTART_DEFAULTS[method]})
    values.update(explicit)
    cfg = build_config(method, values)
    if cfg.train.output_dir is None or not str(cfg.train.output_dir).strip():
        raise ConfigError("--output_dir is required (where the model, metrics and predictions are written)")
    replaced = [f"--{k}" for k in QUICKSTART_REPLACES if explicit.get(k) is not None]
    if cfg.train.quickstart and replaced:
        warn_once(
            f"--quickstart trains its own tiny model on synthetic dialogues: {', '.join(replaced)} "
            f"{'is' if len(replaced) == 1 else 'are'} ignored (leave out --quickstart to use them)"
        )
    d = cfg.data
    files = {"train": d.train_file, "validation": d.validation_file, "test": d.test_file}
    check_sagemaker_channels(cfg.train.do_eval and cfg.train.eval_split == "test", files)
    cfg.command = command_line(argv, f"scripts/train_{method}.py")
    cfg.config_file = config_path
    return cfg


#: Settings that ``--quickstart`` replaces with its generated model and data.
QUICKSTART_REPLACES = (
    "model_name_or_path",
    "tokenizer_name",
    "dataset_name",
    "dataset_config_name",
    "train_file",
    "validation_file",
    "test_file",
)


#: Characters W&B refuses in a project name; '/' and '\\' would also lead the TensorBoard folder (named after
#: the project) out of the output folder.
_PROJECT_FORBIDDEN = "/\\#?%:"


def project_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a W&B project and TensorBoard folder name, or None."""
    bad = sorted({c for c in name if c in _PROJECT_FORBIDDEN or not c.isprintable()})
    if bad:
        return f"it may not contain {' '.join(map(repr, bad))}"
    if name.strip() in ("", ".", ".."):
        return "it must be a name (not empty, '.' or '..')"
    if len(name) > 128:
        return f"it is {len(name)} characters long, more than the 128 W&B allows"
    return None


def warn_once(message: str) -> None:
    """A warning from the main process only (every process parses the same flags and plans the same run)."""
    if is_main_launch_process():
        logger.warning(message)


def idle_settings(cfg: Config, total_steps: int) -> list[str]:
    """Settings that would silently do nothing in a run of ``total_steps`` optimizer steps, one message each."""
    t = cfg.train
    found = []
    users = [
        flag
        for flag, on in (
            ("--load_best_model_at_end", t.load_best_model_at_end),
            ("--early_stopping_patience", t.early_stopping_patience),
        )
        if on
    ]
    if t.do_train and t.eval_steps and t.eval_steps > total_steps and users:
        found.append(
            f"--eval_steps {t.eval_steps} is beyond the run's last optimizer step ({total_steps}): no evaluation "
            f"happens during training, so {' and '.join(users)} {'has' if len(users) == 1 else 'have'} no effect; "
            f"use --eval_steps {total_steps} or less"
        )
    warmup = t.num_warmup_steps if t.num_warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    if t.do_train and warmup and warmup >= total_steps and t.lr_scheduler_type != "constant":
        found.append(
            f"the warm-up ({warmup} steps) is not shorter than the run ({total_steps} optimizer steps): the learning "
            f"rate never reaches {cfg.learning_rate:g}; use a shorter --num_warmup_steps/--warmup_ratio"
        )
    return found


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


def check_hub_arguments(h: HubArguments) -> None:
    """The hub flags: a valid repository id, and no hub setting without ``--push_to_hub``."""
    if h.hub_model_id is not None and not re.fullmatch(r"([\w.-]+/)?[\w.-]+", h.hub_model_id):
        raise ConfigError(f"--hub_model_id must be 'name' or 'namespace/name', got {h.hub_model_id!r}")
    if (h.hub_model_id or h.hub_private_repo) and not h.push_to_hub:
        raise ConfigError("--hub_model_id/--hub_private_repo are settings of --push_to_hub; add --push_to_hub")


def plain_int(text: str) -> int | None:
    """``text`` as a non-negative integer when it is written with ASCII digits only, else None.

    (``str.isdigit`` also accepts characters such as '²' that ``int`` refuses.)
    """
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


def checkpoint_every(checkpointing_steps: str | None) -> int:
    """``--checkpointing_steps`` as a number of optimizer steps; 0 when unset or ``epoch``."""
    return plain_int(str(checkpointing_steps)) or 0 if checkpointing_steps is not None else 0


def _positive(name: str, value: float | None, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"--{name} is required")
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--{name} must be {bound}, got {value}")


def _choice_error(flag: str, value: Any, choices: Sequence[Any]) -> ConfigError:
    """The one message for a value outside a setting's choices (from the command line, a YAML file or code)."""
    return ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_choices(cfg: Config) -> None:
    """Every setting typed as a ``Literal`` holds one of its values (the flags' parser checks the command line;
    this covers YAML files and :func:`build_config`)."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if typing.get_origin(hints[f.name]) is Literal:
                value = getattr(section, f.name)
                if value not in typing.get_args(hints[f.name]):
                    raise _choice_error(f"--{f.name}", value, typing.get_args(hints[f.name]))


def validate(cfg: Config) -> None:
    """Check every value; raise :class:`ConfigError` naming the first bad flag."""
    d, t, lo, g, tr = cfg.data, cfg.train, cfg.lora, cfg.gen, cfg.track
    for name in SECTIONS:  # nan/inf pass every comparison below unnoticed (and nan is not valid JSON)
        for key, value in dataclasses.asdict(getattr(cfg, name)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{key} must be a finite number, got {value}")
    _check_choices(cfg)
    for key in PATH_FIELDS:
        value = getattr(getattr(cfg, field_names()[key]), key)
        problem = name_length_problem(value) if isinstance(value, str) else None
        if problem:
            raise ConfigError(f"--{key} {shorten(value)}: {problem}")
    if not cfg.model.model_name_or_path and not t.quickstart:
        raise ConfigError("--model_name_or_path must not be empty")
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
    if d.max_tokens_per_batch is not None:
        _positive("max_tokens_per_batch", d.max_tokens_per_batch)
        largest = d.max_source_length + d.max_target_length  # the widest example, padded, takes this many
        if d.max_tokens_per_batch < largest:
            raise ConfigError(
                f"--max_tokens_per_batch {d.max_tokens_per_batch} does not fit one example of the maximum size: "
                f"--max_source_length {d.max_source_length} + --max_target_length {d.max_target_length} = {largest} "
                f"padded tokens; use at least {largest}"
            )
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
    if not 0 <= t.label_smoothing_factor < 1:
        raise ConfigError(f"--label_smoothing_factor must be in [0, 1), got {t.label_smoothing_factor}")
    _positive("num_train_epochs", t.num_train_epochs, allow_none=False)
    _positive("max_train_steps", t.max_train_steps)
    _positive("num_warmup_steps", t.num_warmup_steps, allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    _positive("max_grad_norm", t.max_grad_norm, allow_zero=True)
    if t.checkpointing_steps is not None and t.checkpointing_steps != "epoch":
        if checkpoint_every(t.checkpointing_steps) <= 0:
            raise ConfigError(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {t.checkpointing_steps!r}"
            )
    if not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {t.seed}")
    if t.overwrite_output_dir and t.resume_from_checkpoint == "latest":
        raise ConfigError(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint latest would continue "
            "from; pass only one of them"
        )
    _positive("save_total_limit", t.save_total_limit)
    if t.max_time is not None:
        try:
            budget = parse_duration(t.max_time)
        except ValueError as exc:
            raise ConfigError(f"--max_time: {exc}") from exc
        _positive("max_time", budget)
    if t.checkpoint_dir is not None and not str(t.checkpoint_dir).strip():
        raise ConfigError("--checkpoint_dir must not be empty")
    _positive("ddp_timeout", t.ddp_timeout, allow_none=False)
    _positive("eval_steps", t.eval_steps)
    _positive("early_stopping_patience", t.early_stopping_patience)
    if t.metric_for_best != "eval_loss" and t.eval_steps and not t.eval_with_generation:
        raise ConfigError(f"--metric_for_best {t.metric_for_best} needs --eval_with_generation (ROUGE during training)")
    if t.early_stopping_patience is not None and not t.eval_steps:
        raise ConfigError("--early_stopping_patience needs --eval_steps")
    if t.load_best_model_at_end and not (t.eval_steps and t.checkpointing_steps and t.do_train):
        raise ConfigError(
            "--load_best_model_at_end needs --eval_steps (to find the best step) and --checkpointing_steps (to "
            "keep its weights)"
        )
    if lo.merge_lora and cfg.method not in ADAPTER_METHODS:
        raise ConfigError("--merge_lora merges an adapter: use it with scripts/train_lora.py or train_ia3.py")
    if lo.merge_lora and not t.do_train:
        raise ConfigError("--merge_lora needs --do_train (it merges the adapter this run trains)")
    check_hub_arguments(cfg.hub)
    _positive("lora_r", lo.lora_r, allow_none=False)
    _positive("lora_alpha", lo.lora_alpha, allow_none=False)
    if not 0 <= lo.lora_dropout < 1:
        raise ConfigError(f"--lora_dropout must be in [0, 1), got {lo.lora_dropout}")
    if not lo.lora_target_modules:
        raise ConfigError("--lora_target_modules needs at least one module name (e.g. q v)")
    validate_lora_variant(cfg)
    validate_ia3(cfg)
    _positive("max_new_tokens", g.max_new_tokens, allow_none=False)
    _positive("num_beams", g.num_beams, allow_none=False)
    _positive("no_repeat_ngram_size", g.no_repeat_ngram_size, allow_zero=True)
    # the project names the TensorBoard folder too: it must stay a name inside the output folder
    project, source = (
        (tr.wandb_project, "--wandb_project")
        if tr.wandb_project
        else (os.environ.get("WANDB_PROJECT"), "WANDB_PROJECT")
    )
    problem = project_name_problem(project) if project is not None and tr.report_to != "none" else None
    if problem:
        raise ConfigError(f"{source} {project!r}: {problem}")


def validate_lora_variant(cfg: Config) -> None:
    """The LoRA family flags (``--use_dora``, ``--use_rslora``, ``--init_lora_weights``, ``--loraplus_lr_ratio``,
    ``all-linear``): values peft can apply together, and only with ``train_lora.py``. Checks needing peft itself
    (what the installed version offers) run in :func:`dialogsum.adapters.check_adapter`."""
    lo = cfg.lora
    variant = [
        flag
        for flag, used in (
            ("--use_dora", lo.use_dora),
            ("--use_rslora", lo.use_rslora),
            (f"--init_lora_weights {lo.init_lora_weights}", lo.init_lora_weights != "true"),
            ("--loraplus_lr_ratio", lo.loraplus_lr_ratio is not None),
        )
        if used
    ]
    if variant and cfg.method != "lora":
        raise ConfigError(f"{variant[0]} is a LoRA setting: use it with scripts/train_lora.py")
    check_all_linear_alone(lo.lora_target_modules)
    init = lo.init_lora_weights
    if init in LORA_INITS_REFUSED:
        raise ConfigError(
            f"--init_lora_weights {init} needs {LORA_INITS_REFUSED[init]}; use one of {', '.join(LORA_INITS)}"
        )
    niter = re.fullmatch(r"pissa_niter_([0-9]+)", init)
    if init not in LORA_INITS and not niter:
        raise ConfigError(f"--init_lora_weights must be one of {', '.join(LORA_INITS)}, got {init!r}")
    if niter and int(niter.group(1)) > PISSA_NITER_MAX:  # each iteration is a pass over every adapted weight
        raise ConfigError(
            f"--init_lora_weights {init}: N goes from 0 to {PISSA_NITER_MAX} subspace iterations (peft suggests 4 "
            "to 16)"
        )
    if lo.use_dora and mutates_base_weights(init):
        raise ConfigError(
            f"--use_dora with --init_lora_weights {init}: a {init} adapter is saved converted to plain LoRA against "
            "the original base weights, and that conversion cannot carry DoRA's magnitudes; use one of them"
        )
    if init == "orthogonal" and lo.lora_r % 2:
        raise ConfigError(f"--init_lora_weights orthogonal needs an even --lora_r, got {lo.lora_r}")
    if lo.loraplus_lr_ratio is not None and lo.loraplus_lr_ratio <= 0:
        raise ConfigError(f"--loraplus_lr_ratio must be > 0 (LoRA+ suggests 2 to 16), got {lo.loraplus_lr_ratio}")


def check_all_linear_alone(targets: Sequence[str]) -> None:
    """``all-linear`` selects every linear layer: naming others beside it is a ConfigError."""
    if "all-linear" in targets and len(targets) > 1:
        raise ConfigError("--lora_target_modules all-linear already takes every linear layer; give it alone")


def mutates_base_weights(init_lora_weights: str) -> bool:
    """Whether a LoRA initialisation rewrites the base weights (PiSSA, OLoRA: ``W_res = W - scale B0 A0``)."""
    return init_lora_weights in ("pissa", "olora") or init_lora_weights.startswith("pissa_niter_")


def validate_ia3(cfg: Config) -> None:
    """The IA3 flags: at least one target, feed-forward modules among the targets (peft requires it)."""
    ia = cfg.ia3
    if not ia.ia3_target_modules:
        raise ConfigError("--ia3_target_modules needs at least one module name (e.g. k v wo)")
    extra = [m for m in ia.ia3_feedforward_modules if m not in ia.ia3_target_modules]
    if extra:
        raise ConfigError(
            f"--ia3_feedforward_modules {' '.join(extra)} must also be in --ia3_target_modules "
            f"({' '.join(ia.ia3_target_modules)})"
        )


def describe_method(config: dict[str, Any]) -> str:
    """One line naming the method and its settings, from a run's flat config (``config.yaml``): e.g.
    ``LoRA r=32 alpha=32 q,v DoRA rsLoRA init=pissa LoRA+x16``, ``IA3 k,v,wo (feed-forward wo)``, ``full``."""
    method = str(config.get("method") or "")
    if method == "lora":
        targets = config.get("lora_target_modules") or []
        parts = [f"LoRA r={config.get('lora_r')} alpha={config.get('lora_alpha')} {','.join(map(str, targets))}"]
        if config.get("use_dora"):
            parts.append("DoRA")
        if config.get("use_rslora"):
            parts.append("rsLoRA")
        if str(config.get("init_lora_weights", "true")) != "true":
            parts.append(f"init={config.get('init_lora_weights')}")
        if config.get("loraplus_lr_ratio") is not None:
            parts.append(f"LoRA+x{config.get('loraplus_lr_ratio'):g}")
        return " ".join(parts)
    if method == "ia3":
        targets = ",".join(map(str, config.get("ia3_target_modules") or []))
        feedforward = ",".join(map(str, config.get("ia3_feedforward_modules") or []))
        return f"IA3 {targets} (feed-forward {feedforward or 'none'})"
    return method or "unknown"
