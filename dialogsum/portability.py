"""Saved folders that load the same under every supported transformers and peft (pyproject.toml's floors up to
the newest): the few places where what the newest versions write is read differently, or refused, by the oldest.

:func:`make_portable` rewrites, after ``save_pretrained``, the files of a model, adapter or checkpoint folder:

- ``config.json``: transformers 5.x writes ``tie_word_embeddings: true`` for every T5 and keeps a checkpoint's own
  ``lm_head`` on load; transformers 4.x reads the flag literally, ties ``lm_head`` to the embedding and rescales
  the decoder output. A folder whose weights hold their own ``lm_head.weight`` (FLAN-T5) says
  ``tie_word_embeddings: false``, which both read as FLAN-T5 (5.x: no output scaling, head kept).
- ``config.json``'s ``dtype``/``torch_dtype`` is that of the tensors saved (:func:`_config_dtype`).
- ``tokenizer_config.json``: transformers 5.x writes the additional special tokens (T5's ``<extra_id_N>``) as a
  list under ``extra_special_tokens``, a key 4.x reads as a dict of named tokens (``AttributeError``); they are
  written as ``additional_special_tokens``, the key both read.
- ``adapter_config.json``: peft refuses keys it does not know. Keys that peft 0.13 (the floor) does not know are
  dropped when they hold the newer peft's default (a feature not used, so nothing is lost); the base model path
  is made absolute when it is a local folder given relative to the working directory, so that the adapter loads
  from anywhere (hub ids stay ids).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dialogsum.files import json_object_or_none, write_json

#: The keys of ``adapter_config.json`` that peft 0.13 (pyproject.toml's floor) reads: the fields of its
#: ``LoraConfig`` (with ``PeftConfig``'s). Any other key makes ``LoraConfig(**saved)`` raise a TypeError there.
FLOOR_LORA_KEYS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
        "rank_pattern", "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
    }
)  # fmt: skip

#: Keys written by newer peft as metadata, not settings: safe to leave out.
_PEFT_METADATA = ("peft_version",)


def make_portable(folder: str | Path) -> list[str]:
    """Rewrite the saved files of ``folder`` (model, adapter, checkpoint) so that every supported transformers and
    peft load the same model from it. Returns what was changed, one phrase per change (empty when nothing was)."""
    path = Path(folder)
    changes: list[str] = []
    changes += _untied_head_config(path)
    changes += _config_dtype(path)
    changes += _tokenizer_special_tokens(path)
    changes += _adapter_config(path)
    return changes


def checkpoint_has_own_lm_head(name_or_path: str) -> bool | None:
    """Whether the checkpoint stores an ``lm_head.weight`` of its own (FLAN-T5 does); None when unknown."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        try:
            from transformers.utils import cached_file

            resolved = cached_file(name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        if resolved is None:
            return None
        folder = Path(resolved).parent
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return "lm_head.weight" in ((json_object_or_none(index) or {}).get("weight_map") or {})
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return "lm_head.weight" in fh.keys()
    return None


def _read(path: Path) -> dict[str, Any] | None:
    return json_object_or_none(path) if path.is_file() else None


def _untied_head_config(folder: Path) -> list[str]:
    config = _read(folder / "config.json")
    if config is None or config.get("tie_word_embeddings") is False:
        return []
    # a head of its own together with output scaling (original T5 when untied) cannot be said to 4.x; leave it
    if config.get("scale_decoder_outputs") is True or not checkpoint_has_own_lm_head(str(folder)):
        return []
    config["tie_word_embeddings"] = False
    write_json(folder / "config.json", config)
    return ["config.json: tie_word_embeddings false (the weights hold their own lm_head)"]


#: safetensors dtype names -> the names config.json uses.
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _config_dtype(folder: Path) -> list[str]:
    """``config.json``'s ``dtype`` (5.x; ``torch_dtype`` in 4.x) says the dtype of the saved tensors.

    ``save_pretrained`` writes the dtype of the model object, which under DeepSpeed bf16 is bf16 even when the
    weights saved are the fp32 master copy; ``from_pretrained(dtype="auto")`` (5.x's default) would load them
    rounded to bf16 again.
    """
    config = _read(folder / "config.json")
    single = folder / "model.safetensors"
    if config is None or not single.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as fh:
        kinds = {fh.get_slice(name).get_dtype() for name in fh.keys()}
    floats = {_FLOAT_DTYPES[k] for k in kinds if k in _FLOAT_DTYPES}
    if len(floats) != 1:
        return []
    dtype = floats.pop()
    keys = [k for k in ("dtype", "torch_dtype") if k in config and config[k] != dtype]
    if not keys:
        return []
    for key in keys:
        config[key] = dtype
    write_json(folder / "config.json", config)
    return [f"config.json: {', '.join(keys)} {dtype} (the dtype of the saved weights)"]


def _tokenizer_special_tokens(folder: Path) -> list[str]:
    changes = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _read(folder / name)
        if config is None or not isinstance(config.get("extra_special_tokens"), list):
            continue
        extra = config.pop("extra_special_tokens")
        known = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = known + [t for t in extra if t not in known]
        write_json(folder / name, config)
        changes.append(f"{name}: extra_special_tokens written as additional_special_tokens")
    return changes


def _adapter_config(folder: Path) -> list[str]:
    config = _read(folder / "adapter_config.json")
    if config is None:
        return []
    changes = []
    defaults = _lora_defaults()
    dropped = [
        key
        for key, value in config.items()
        if key not in FLOOR_LORA_KEYS and (key in _PEFT_METADATA or (key in defaults and defaults[key] == value))
    ]
    for key in dropped:
        del config[key]
    if dropped:
        changes.append(f"adapter_config.json: left out {', '.join(sorted(dropped))} (unused; peft 0.13 refuses them)")
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base and not os.path.isabs(base) and Path(base).is_dir():
        config["base_model_name_or_path"] = str(Path(base).resolve())
        changes.append(f"adapter_config.json: base model {base} recorded as {config['base_model_name_or_path']}")
    if changes:
        write_json(folder / "adapter_config.json", config)
    return changes


def _lora_defaults() -> dict[str, Any]:
    """The default value of every field of the installed peft's ``LoraConfig``, as ``to_dict`` would write it."""
    from peft import LoraConfig

    return LoraConfig().to_dict()
