"""The model card: ``README.md`` in a run's output folder, in the Hugging Face hub's format.

The YAML metadata is built with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` and
:class:`~huggingface_hub.EvalResult` (the model-index the hub shows as an evaluation widget), and the whole card
goes through :class:`~huggingface_hub.ModelCard` before it is written: peft's ``save_pretrained`` parses an
existing ``README.md``, so a card it cannot read would break a later run into the same folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dialogsum.config import ADAPTER_METHODS, LAB_PROMPT
from dialogsum.files import write_text
from dialogsum.formatting import is_number, markdown_table, plain
from dialogsum.metrics import PROTOCOLS, ROUGE_KEYS, ROUGE_LABELS
from dialogsum.report import (
    PROTOCOL_TEXT,
    data_description,
    generation_text,
    hyperparameter_rows,
    method_name,
    resource_rows,
    rouge_rows,
)

DIALOGSUM_LICENCE = (
    "DialogSum (Chen et al., 2021) is released under the Creative Commons "
    "Attribution-NonCommercial-ShareAlike 4.0 licence (CC BY-NC-SA 4.0): non-commercial use, with "
    "attribution, and derivatives shared under the same terms. Weights trained on it derive from it; check "
    "that your use complies. FLAN-T5 itself is Apache-2.0."
)


def _is_hub_id(name: str) -> bool:
    """A ``owner/name`` hub id that is not a local folder."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _hub_dataset(config: Mapping[str, Any]) -> str | None:
    """The hub dataset the run trained on, or None (quick start or local files)."""
    dataset = config.get("dataset_name")
    local = config.get("quickstart") or any(config.get(k) for k in ("train_file", "validation_file", "test_file"))
    return dataset if isinstance(dataset, str) and _is_hub_id(dataset) and not local else None


def card_data(
    metrics: Mapping[str, Any], config: Mapping[str, Any], name: str, base: str, method: str, merged: bool = False
) -> ModelCardData:
    """The card's metadata: base model (a hub id only), library, task, tags, dataset and headline ROUGE (F1 x 100).

    ``merged``: a LoRA or IA3 adapter merged into its base model (a plain transformers model).
    """
    adapter = method in ADAPTER_METHODS
    tags = ["summarization", "dialogue-summarization", "dialogsum"]
    if "t5" in base.lower():
        tags.append("flan-t5" if "flan" in base.lower() else "t5")
    if merged:
        tags += [method if adapter else "lora", "merged"]
    else:
        tags += [method, "peft"] if adapter else ["full-fine-tuning"]
    dataset = _hub_dataset(config)
    if config.get("quickstart"):
        data_name = "synthetic quick-start dialogues"
    elif dataset:
        data_name = "DialogSum" if "dialogsum" in dataset.lower() else dataset
    else:
        data_name = data_description(config).replace("`", "")
    split = str(metrics.get("eval_split", config.get("eval_split", "test")))
    results = [
        EvalResult(
            task_type="summarization",
            task_name="Dialogue summarization",
            dataset_type=dataset or "local",
            dataset_name=data_name,
            dataset_split=split,
            metric_type="rouge",
            metric_name=ROUGE_LABELS[key],
            metric_value=round(100 * metrics[key], 2),
        )
        for key in ROUGE_KEYS
        if is_number(metrics.get(key))
    ]
    return ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="peft" if adapter and not merged else "transformers",
        pipeline_tag="summarization",
        tags=tags,
        datasets=[dataset] if dataset else None,
        metrics=["rouge"],
        model_name=name if results else None,
        eval_results=results or None,
    )


def _usage(method: str, base: str, folder: str, prompt: str, config: Mapping[str, Any], generation: str) -> list[str]:
    """The card's "How to use" code: load the folder (and its base model for LoRA) and summarize.

    ``generation_config.json`` holds the evaluation's generation settings (``generation``), so a plain
    ``generate()`` summarizes as the evaluation did; peft does not read it from an adapter folder, hence the line
    that loads it for LoRA.
    """
    if method in ADAPTER_METHODS:
        load = [
            "from peft import PeftModel",
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig",
            "",
            f'adapter_dir = "path/to/{folder}"  # this folder, or its hub repo id',
            f'base = AutoModelForSeq2SeqLM.from_pretrained("{base}")',
            "base.generation_config = GenerationConfig.from_pretrained(adapter_dir)  # peft does not load it",
            "model = PeftModel.from_pretrained(base, adapter_dir)  # .merge_and_unload() for a plain model",
            "tokenizer = AutoTokenizer.from_pretrained(adapter_dir)",
        ]
    else:
        load = [
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            "",
            f'model_dir = "path/to/{folder}"  # this folder, or its hub repo id',
            "model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)",
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
        ]
    settings = f"  # generation_config.json: {generation}" if generation else ""
    return [
        "```python",
        *load,
        "",
        f"prompt = {json.dumps(prompt)}.format(dialogue=dialogue)",
        'inputs = tokenizer(prompt, return_tensors="pt", truncation=True, '
        f"max_length={plain(config.get('max_source_length') or 512)})",
        f"summary_ids = model.generate(**inputs){settings}",
        "# decoded as predictions.jsonl was",
        "print(tokenizer.decode(summary_ids[0], skip_special_tokens=True, clean_up_tokenization_spaces=True))",
        "```",
    ]


def write_model_card(
    output_dir: str | Path, metrics: Mapping[str, Any], config: Mapping[str, Any], merged: bool = False
) -> Path:
    """Write ``README.md`` in ``output_dir``: a Hugging Face model card for the trained model or adapter
    (``merged``: a LoRA adapter merged into its base model by :mod:`dialogsum.export`).

    ``metrics`` is the content of ``metrics.json``, ``config`` the flat resolved config (``cfg.to_dict()``).
    Metadata: see :func:`card_data`. Then: model description (base model, method), training data,
    hyperparameters, evaluation (every protocol present, split, generation settings), resources, intended use
    and limitations, the DialogSum licence note, and how to load it.
    """
    out = Path(output_dir)
    method = str(config.get("method") or metrics.get("method") or "full")
    base = str(metrics.get("model_name_or_path") or config.get("model_name_or_path") or "?")
    name = str(config.get("run_name") or out.resolve().name)
    prompt = str(config.get("prompt_template") or LAB_PROMPT)
    label = method_name(method if method in ADAPTER_METHODS else "lora")
    kind = f"a {label} adapter for" if method in ADAPTER_METHODS else "a fully fine-tuned version of"
    if merged:
        kind = f"a {label} fine-tune (the adapter merged into the weights, a standalone model) of"
    link = "https://huggingface.co/" + base if _is_hub_id(base) else base
    parts = [
        f"# {name}",
        "",
        f"This model is {kind} [`{base}`]({link}), trained to summarize dialogues with {method_name(method)} on "
        f"{data_description(config)}. It was produced with the `dialogsum` toolkit (plain Accelerate training loop).",
        "",
        "## Training",
        "",
        markdown_table(["", "value"], hyperparameter_rows(config, metrics)),
        "",
        "Prompt used for training and evaluation (`{dialogue}` is replaced by the dialogue):",
        "",
        "```text",
        prompt.rstrip("\n"),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    header, rows = rouge_rows(metrics)
    if rows:
        split = metrics.get("eval_split", config.get("eval_split", "test"))
        examples = metrics.get("num_examples", metrics.get("num_eval_examples"))
        parts.append(
            f"ROUGE F1 × 100 (rouge_score, Porter stemmer, sentences split on newlines for ROUGE-Lsum) on the {split} "
            f"split: {plain(examples)} dialogues, {plain(metrics.get('num_references'))} references."
        )
        parts += ["", markdown_table(header, rows), ""]
        headline = metrics.get("headline_protocol")
        for protocol in PROTOCOLS:
            if isinstance(metrics.get(protocol), Mapping):
                mark = " (headline, used in the metadata above)" if protocol == headline else ""
                parts.append(f"- **{protocol}**{mark}: {PROTOCOL_TEXT[protocol]}.")
        if generation_text(metrics):
            parts.append(f"- Generation: {generation_text(metrics)}.")
        if merged:
            parts.append("- Evaluated as the adapter on its base model; the merged weights give the same predictions.")
        parts.append("")
    else:
        parts += ["This run was not evaluated.", ""]
    resources = resource_rows(metrics, {})
    if resources:
        parts += ["## Resources", "", markdown_table(["", "value"], resources), ""]
    parts += ["## Intended use and limitations", ""]
    if config.get("quickstart"):
        parts.append(
            "- **Demo model**: a tiny random T5 trained on synthetic template dialogues by `--quickstart` to "
            "check the pipeline end to end. It is not useful for summarizing real conversations."
        )
    licence = (
        DIALOGSUM_LICENCE
        if not config.get("quickstart")
        else "The quick-start data is synthetic (no DialogSum text). " + DIALOGSUM_LICENCE.split(": ")[0] + "."
    )
    parts += [
        "- Intended for research on abstractive summarization of short, English, everyday two-person "
        "dialogues like DialogSum's (meetings, shopping, travel, small talk).",
        "- Summaries can omit or invent facts, confuse who said what, and copy speaker tags; check them "
        "before relying on them. ROUGE measures word overlap with human summaries, not factual correctness.",
        "- Not evaluated on other domains, languages, long multi-party meetings or transcripts with ASR errors.",
        "- Inputs longer than the maximum source length above are truncated.",
        "",
        "## Licence",
        "",
        licence,
        "",
        "## How to use",
        "",
        *_usage("full" if merged else method, base, out.resolve().name, prompt, config, generation_text(metrics)),
        "",
    ]
    data = card_data(metrics, config, name, base, method, merged)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))
    return write_text(out / "README.md", str(card))
