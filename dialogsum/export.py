"""Merge a LoRA adapter into its base model: a standalone model folder for deployment.

The result loads with ``AutoModelForSeq2SeqLM.from_pretrained`` alone (peft not needed) and generates what base +
adapter generate: ``model.safetensors`` + ``config.json``, the run's ``generation_config.json``, the tokenizer,
a model card, and the run's ``config.yaml`` (evaluate.py and summarize.py read the prompt from it) and
``metrics.json`` when the adapter folder has them. The adapter may be a run's output folder or one of its
``checkpoint-N/`` folders. Used by ``scripts/export.py`` and by ``train_lora.py --merge_lora``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dialogsum.errors import UserError
from dialogsum.files import discard, json_object_or_none, write_bytes
from dialogsum.run_folder import (
    check_can_create,
    check_folder_contents,
    check_not_an_input,
    held_folder,
    take_output_dir,
)

logger = logging.getLogger(__name__)

#: Files of the adapter folder copied into the export as they are.
COPIED_FILES = ("config.yaml", "metrics.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def adapter_base(adapter_path: str | Path) -> str | None:
    """The base model an adapter was trained on (``base_model_name_or_path`` of ``adapter_config.json``)."""
    return (json_object_or_none(Path(adapter_path) / "adapter_config.json") or {}).get("base_model_name_or_path")


def check_export(adapter_path: str, output_dir: str, base: str | None, overwrite: bool) -> str:
    """Every check that needs no weights: the adapter folder, its base model, the output folder (never an
    input, creatable, empty unless ``overwrite``). Returns the base model to use."""
    from dialogsum.inference import check_model_and_adapter

    if not Path(adapter_path).is_dir():
        raise UserError(f"--adapter_path not found: {adapter_path}")
    if not (Path(adapter_path) / "adapter_config.json").is_file():
        full = (
            " (it holds a full model, which needs no merging)" if (Path(adapter_path) / "config.json").is_file() else ""
        )
        raise UserError(f"{adapter_path} is not a LoRA adapter folder (no adapter_config.json){full}")
    base = base or adapter_base(adapter_path)
    if not base:
        raise UserError(f"{adapter_path} does not name its base model; pass --model_name_or_path")
    check_model_and_adapter(base, adapter_path)
    out = Path(output_dir)
    inputs = [("--adapter_path", Path(adapter_path).resolve())]
    if Path(base).exists():
        inputs.append(("--model_name_or_path", Path(base).resolve()))
    check_not_an_input(out, "--output_dir", inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file")
    check_can_create(out, "--output_dir")
    take_output_dir(out)  # held until the export ends (released by the caller: release_output_dirs)
    check_folder_contents(out, overwrite)
    return base


def merge_adapter(adapter_path: str | Path, base: str) -> tuple[Any, Any]:
    """(merged model, tokenizer): ``base`` with the adapter's LoRA updates added into its weights, and the
    adapter's generation config (the run's generation settings) as its own."""
    from transformers import GenerationConfig

    from dialogsum.modeling import load_adapter, load_model, load_tokenizer

    folder = Path(adapter_path)
    model = load_model(base, fused_activations=False)  # the saved modules stay transformers' own
    merged = load_adapter(model, str(folder)).merge_and_unload()
    if (folder / "generation_config.json").is_file():
        merged.generation_config = GenerationConfig.from_pretrained(str(folder))
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(str(folder) if has_tokenizer else base)
    merged.eval()
    return merged, tokenizer


def export_merged(adapter_path: str | Path, output_dir: str | Path, base: str) -> Path:
    """Write the merged model of ``adapter_path`` on ``base`` to ``output_dir`` (replacing it whole).

    Everything is written into a temporary sibling folder first and renamed into place at the end, so a
    failure never leaves a half-written model under ``output_dir``. A folder this process holds
    (scripts/export.py) keeps what is not a run's: only the previous export's files are replaced. Returns
    ``output_dir``.
    """
    from dialogsum.model_card import write_model_card
    from dialogsum.modeling import write_model_folder

    folder, out = Path(adapter_path), Path(output_dir)
    model, tokenizer = merge_adapter(folder, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_model_folder(model, tokenizer, tmp)
        for name in COPIED_FILES:
            if (folder / name).is_file():
                write_bytes(tmp / name, (folder / name).read_bytes())
        metrics = _read_json(folder / "metrics.json")
        config = _read_yaml(folder / "config.yaml") or {"method": "lora", "model_name_or_path": base}
        write_model_card(tmp, metrics, config, merged=True)
        held = held_folder(out)
        if held is not None:  # a folder this run holds: the previous export's files go, a person's stay
            held.move_in(tmp)
        else:  # a folder inside a run's own (train_lora.py --merge_lora): replaced whole
            if out.exists():
                discard([out], Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")))
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s into %s: %s (loads without peft)", folder, base, out)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json_object_or_none(path) or {}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
