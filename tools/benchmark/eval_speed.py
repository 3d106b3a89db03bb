"""The evaluation test of our default case: summaries/s of batched, length-sorted generation
(:func:`dialogsum.evaluation.generate_summaries`) against one ``generate`` call per dialogue (the lab's way), same
model, precision and generation settings."""

from __future__ import annotations

import time
from typing import Any

import torch

from tools.benchmark.measure import sync


def _one_at_a_time(
    accelerator: Any, model: Any, tokenizer: Any, texts: list[str], spec: dict[str, Any], kwargs: dict[str, Any]
) -> list[str]:
    """The lab's loop: one prompt, one ``generate`` call (``kwargs``: the generation settings)."""
    from dialogsum.data import build_prompt

    out = []
    for dialogue in texts:
        enc = tokenizer(
            build_prompt(dialogue, spec["prompt_template"]),
            return_tensors="pt",
            truncation=True,
            max_length=spec["max_source_length"],
        )
        # eager, as generate_summaries runs (a compiled model would recompile for every decoding step)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), accelerator.autocast():
            ids = model.generate(input_ids=enc.input_ids.to(accelerator.device), **kwargs)
        out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return out


def _mean_tokens(tokenizer: Any, texts: list[str]) -> float:
    """Mean tokens per generated summary."""
    return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts) / max(len(texts), 1)


def eval_speed(spec: dict[str, Any], accelerator: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Summaries/s both ways over ``spec["eval_dialogues"]`` (one warm-up dialogue first, excluded)."""
    from dialogsum.config import GenerationArguments
    from dialogsum.evaluation import generate_summaries
    from dialogsum.modeling import generation_kwargs, load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer_path"])
    dialogues = spec["eval_dialogues"]
    gen = GenerationArguments(max_new_tokens=spec["max_new_tokens"], num_beams=1)
    kwargs = generation_kwargs(gen, tokenizer.pad_token_id)
    model.eval()
    _one_at_a_time(accelerator, model, tokenizer, dialogues[:1], spec, kwargs)  # warm-up, excluded
    sync(accelerator.device)
    start = time.perf_counter()
    single = _one_at_a_time(accelerator, model, tokenizer, dialogues, spec, kwargs)
    sync(accelerator.device)
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = generate_summaries(
        accelerator, model, tokenizer, dialogues, spec["prompt_template"], gen, spec["eval_batch_size"],
        spec["max_source_length"], desc="batched generation",
    )  # fmt: skip
    sync(accelerator.device)
    batched_s = time.perf_counter() - start
    n = len(dialogues)
    return {
        "dialogues": n,
        "batch_size": spec["eval_batch_size"],
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "mixed_precision": accelerator.mixed_precision,
        "one_at_a_time_s": single_s,
        "batched_s": batched_s,
        "one_at_a_time_summaries_per_s": n / single_s,
        "batched_summaries_per_s": n / batched_s,
        "eval_speedup": single_s / batched_s,
        "mean_summary_tokens_one_at_a_time": _mean_tokens(tokenizer, single),
        "mean_summary_tokens_batched": _mean_tokens(tokenizer, batched),
    }
