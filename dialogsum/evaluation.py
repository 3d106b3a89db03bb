"""Evaluation: batched generation over length-sorted batches, eval loss, ROUGE and prediction records.

Generation sorts prompts by length (longest first, so an out-of-memory shows up at once), hands whole batches
to processes round-robin, and puts the summaries back in the original order. Every process runs the same
number of ``generate`` calls (ZeRO-3 needs that, with ``synced_gpus``), padding with a repeated batch whose
results are thrown away, so each example is generated and scored exactly once whatever the world size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dialogsum.config import Config, GenerationArguments
from dialogsum.data import EvalExample, build_prompt, encode_texts
from dialogsum.distributed import is_zero3, mark_progress
from dialogsum.metrics import compute_rouge, eval_set_fingerprint
from dialogsum.modeling import generation_kwargs

logger = logging.getLogger(__name__)


def generation_record(gen: GenerationArguments) -> dict[str, Any]:
    """The generation config as saved with results."""
    return {**asdict(gen), "do_sample": False}


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return input_ids, mask


@torch.no_grad()
def generate_summaries(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    dialogues: list[str],
    prompt_template: str,
    gen: GenerationArguments,
    batch_size: int,
    max_source_length: int,
    desc: str = "generating",
) -> list[str]:
    """Summaries for ``dialogues`` in their original order; the work is split over all processes."""
    if not dialogues:
        return []
    mark_progress(desc)  # named if a collective times out while generating
    prompts = [build_prompt(d, prompt_template) for d in dialogues]
    ids, truncated = encode_texts(tokenizer, prompts, max_source_length)
    if truncated:
        logger.info("%s: %d of %d prompts truncated to %d tokens", desc, truncated, len(ids), max_source_length)
    batches = length_sorted_batches([len(x) for x in ids], batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil(len(batches) / world)
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    kwargs = generation_kwargs(gen, tokenizer.pad_token_id)
    if is_zero3(accelerator):
        kwargs["synced_gpus"] = True  # ranks finish at different lengths; keep them in lock-step
    mine: list[tuple[int, str]] = []
    for r in tqdm(range(rounds), desc=desc, disable=not accelerator.is_local_main_process):
        position = r * world + rank
        real = position < len(batches)
        batch = batches[position] if real else batches[-1]  # filler keeps ranks in step; discarded
        input_ids, mask = _pad_batch([ids[i] for i in batch], tokenizer.pad_token_id)
        # eager even when training compiled the model: every decoding step has new shapes (recompiles, then
        # torch's recompile limit), and generation is short next to training
        with torch.compiler.set_stance("force_eager"), accelerator.autocast():
            out = unwrapped.generate(
                input_ids=input_ids.to(accelerator.device), attention_mask=mask.to(accelerator.device), **kwargs
            )
        if real:
            texts = tokenizer.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            mine.extend((i, t.strip()) for i, t in zip(batch, texts))
    if was_training:
        unwrapped.train()
    gathered = gather_object(mine) if world > 1 else mine
    results: list[str | None] = [None] * len(dialogues)
    for index, text in gathered:
        results[index] = text
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"generation lost {len(missing)} example(s) across processes")
    return [r for r in results if r is not None]


@torch.no_grad()
def evaluation_loss(accelerator: Any, model: torch.nn.Module, dataloader: Any) -> float:
    """Token-weighted mean cross-entropy over a prepared dataloader (each example counted once)."""
    model.eval()
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in dataloader:
        batch = dict(batch)
        batch.pop("num_tokens", None)
        with accelerator.autocast():
            logits = model(**batch).logits
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        ).sum(dim=1)
        tokens = (labels != -100).sum(dim=1)
        loss, tokens = accelerator.gather_for_metrics((loss, tokens))
        total += loss.double().sum()
        count += tokens.double().sum()
    model.train()
    return float(total / count.clamp_min(1))


def evaluate_examples(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[EvalExample],
    prompt_template: str,
    gen: GenerationArguments,
    batch_size: int,
    max_source_length: int,
    desc: str = "evaluating",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate once per unique dialogue and score against all its references.

    Returns ``(metrics, predictions)``: metrics from :func:`dialogsum.metrics.compute_rouge` plus
    ``num_eval_examples``, ``eval_set_fingerprint`` (:func:`~dialogsum.metrics.eval_set_fingerprint`) and
    ``generation``; one prediction record per dialogue.
    """
    predictions = generate_summaries(
        accelerator,
        model,
        tokenizer,
        [e.dialogue for e in examples],
        prompt_template,
        gen,
        batch_size,
        max_source_length,
        desc=desc,
    )
    metrics = compute_rouge(predictions, [e.references for e in examples])
    metrics["num_eval_examples"] = len(examples)
    # what the score was computed on: compare.py refuses to set it against a score on other dialogues/references
    metrics["eval_set_fingerprint"] = eval_set_fingerprint(
        [e.dialogue for e in examples], [e.references for e in examples]
    )
    metrics["generation"] = generation_record(gen)
    records = [
        {"id": e.id, "dialogue": e.dialogue, "reference": e.references[0], "references": e.references, "prediction": p}
        for e, p in zip(examples, predictions)
    ]
    return metrics, records


def evaluate_with_config(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[EvalExample],
    cfg: Config,
    desc: str = "evaluating",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`evaluate_examples` with the prompt, generation and batch settings of a run configuration."""
    return evaluate_examples(
        accelerator,
        model,
        tokenizer,
        examples,
        cfg.data.prompt_template,
        cfg.gen,
        cfg.train.per_device_eval_batch_size,
        cfg.data.max_source_length,
        desc=desc,
    )
