"""The reference case: the usual Accelerate summarization example's loop (``run_summarization_no_trainer.py``),
written as people write it: ``DataLoader(shuffle=True)`` with ``DataCollatorForSeq2Seq``, fp32, plain AdamW,
a linear schedule, no clipping."""

from __future__ import annotations

import time
from typing import Any

import torch

from tools.benchmark.cases import Case
from tools.benchmark.measure import load_case_model, matmul_peak, sync


def _loader(spec: dict[str, Any], tokenizer: Any, model: torch.nn.Module) -> Any:
    """The pool in a shuffled DataLoader with dynamic padding."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq

    pool = spec["pool"]
    dataset = [
        {"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in zip(pool["input_ids"], pool["labels"])
    ]
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=None)
    generator = torch.Generator().manual_seed(spec["seed"])
    return DataLoader(dataset, shuffle=True, collate_fn=collator, batch_size=spec["batch_size"], generator=generator)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (PyTorch's default implementation), no weight decay on biases and layer norms."""
    no_decay = ["bias", "layer_norm.weight"]
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
            "weight_decay": 0.01,
        },
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=5e-5)


def _train(
    accelerator: Any, model: Any, optimizer: Any, lr_scheduler: Any, loader: Any, warmup: int
) -> tuple[float, list[float], list[tuple[int, int]], int]:
    """The example's loop over the pool; the clock starts after ``warmup`` steps. Returns the measured seconds,
    every step's loss, the (prompt, summary) lengths of the measured examples and their padded token count."""
    model.train()
    losses, lengths, padded = [], [], 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == warmup:
            sync(accelerator.device)
            start = time.perf_counter()
        outputs = model(**batch)
        loss = outputs.loss
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if step >= warmup:
            src = batch["attention_mask"].sum(dim=1).tolist()
            tgt = (batch["labels"] != -100).sum(dim=1).tolist()
            lengths += list(zip(src, tgt))
            padded += batch["input_ids"].numel() + batch["labels"].numel()
    sync(accelerator.device)
    return time.perf_counter() - start, [float(x) for x in losses], lengths, padded


def run_reference(spec: dict[str, Any], case: Case) -> dict[str, Any]:
    """The reference case's figures: same model, pool, batch size and steps as ours, fp32, all CPU cores."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer, get_scheduler

    from dialogsum.distributed import peak_memory_mb
    from dialogsum.modeling import parameter_report

    warmup, steps = spec["warmup_steps"], spec["steps"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
    model = load_case_model(spec, case)
    params = parameter_report(model)
    loader = _loader(spec, tokenizer, model)
    optimizer = _optimizer(model)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=warmup + steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    peak_before = matmul_peak(accelerator.device, "no")
    seconds, losses, lengths, padded = _train(accelerator, model, optimizer, lr_scheduler, loader, warmup)
    peak_after = matmul_peak(accelerator.device, "no")
    real = sum(s + t for s, t in lengths)
    return {
        "seconds": seconds,
        "real_tokens": real,
        "samples": len(lengths),
        "padding_fraction": 1.0 - real / padded if padded else 0.0,
        "lengths": lengths,
        "losses": losses,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "matmul_peak_gflops": max(peak_before, peak_after),
        "mixed_precision": "no",
        **params,
    }
