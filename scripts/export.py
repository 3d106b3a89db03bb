"""Export a LoRA run as a standalone model: the adapter merged into its base model (no peft needed to load it).

    python scripts/export.py --adapter_path runs/lora --output_dir runs/lora-merged
    python scripts/export.py --adapter_path runs/lora/checkpoint-500 --output_dir runs/lora-500-merged \
        --push_to_hub --hub_model_id me/flan-t5-dialogsum-lora-merged

Writes model.safetensors, config.json, generation_config.json (the run's generation settings), the tokenizer, a
model card, and the run's config.yaml and metrics.json; the result loads with
AutoModelForSeq2SeqLM.from_pretrained(output_dir) and generates what base + adapter generate. The base model is
the one the adapter names (--model_name_or_path to use another copy of it, e.g. a local folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dialogsum.cli import run_cli
from dialogsum.config import (
    HubArguments,
    ModelArguments,
    TrainingArguments,
    build_parser,
    check_hub_arguments,
    given_flags,
)
from dialogsum.errors import ConfigError

FLAGS: dict[type, tuple[str, ...] | None] = {
    ModelArguments: ("adapter_path", "model_name_or_path"),
    TrainingArguments: ("output_dir", "overwrite_output_dir"),
    HubArguments: None,
}


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the flags, check everything cheap, merge, write, and push with --push_to_hub; returns the folder."""
    values = given_flags(build_parser(__doc__ or "", FLAGS, config_file=False), argv)
    if not values.get("adapter_path"):
        raise ConfigError("--adapter_path is required (a LoRA run's output folder or one of its checkpoint-N folders)")
    if not values.get("output_dir"):
        raise ConfigError("--output_dir is required (where the merged model is written)")
    hub = HubArguments(**{k: v for k, v in values.items() if k in HubArguments.__dataclass_fields__})
    check_hub_arguments(hub)
    from dialogsum.export import check_export, export_merged
    from dialogsum.publish import check_push, push_folder
    from dialogsum.run_folder import release_output_dirs

    out = Path(values["output_dir"])
    try:  # the output folder is locked from its check to the end
        base = check_export(
            values["adapter_path"],
            str(out),
            values.get("model_name_or_path"),
            values.get("overwrite_output_dir", False),
        )
        target = check_push(hub, out.resolve().name)  # token and hub checked before the weights load
        export_merged(values["adapter_path"], out, base)
        if target is not None:
            push_folder(out, target, f"dialogsum: LoRA adapter {Path(values['adapter_path']).name} merged into {base}")
    finally:
        release_output_dirs()
    return out


if __name__ == "__main__":
    run_cli(main)
