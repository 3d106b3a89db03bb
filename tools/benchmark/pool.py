"""The pool: the examples every training case trains on, tokenized once with the library's code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dialogsum.errors import UserError
from tools.benchmark.args import BenchmarkArgs


@dataclass
class Pool:
    """The examples every training case trains on (token ids, unpadded)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dataset_input_ids: list[list[int]]
    """The whole file's examples (the token-budget cases batch all of them)."""
    dataset_labels: list[list[int]]
    epoch_padding_grouped: float
    epoch_padding_random: float
    truncated_sources: int
    rows: int


def _representative_batches(batches: list[list[int]], tokens: list[int], count: int) -> list[list[int]]:
    """``count`` batches at evenly spaced quantiles of their real-token count."""
    order = sorted(range(len(batches)), key=lambda i: sum(tokens[j] for j in batches[i]))
    picks = [order[min(len(order) - 1, int((k + 0.5) * len(order) / count))] for k in range(count)]
    return [batches[i] for i in picks]


def build_pool(args: BenchmarkArgs, tokenizer: Any) -> Pool:
    """Tokenize the data file with the library and pick the pool of examples the cases train on."""
    from dialogsum.config import DataArguments
    from dialogsum.data import LengthGroupedBatchSampler, padding_fraction, read_rows, tokenize_rows, validate_rows

    data_args = DataArguments(
        max_source_length=args.max_source_length,
        max_target_length=args.max_target_length,
        text_column=args.text_column,
        summary_column=args.summary_column,
    )
    rows = validate_rows(read_rows(args.data_file), data_args, "benchmark", args.data_file)
    dataset, stats = tokenize_rows(rows, tokenizer, data_args)
    count = args.warmup_steps + args.steps
    full_batches = len(dataset) // args.batch_size
    if full_batches < count:
        raise UserError(
            f"{args.data_file} has {len(dataset)} rows: too few for {count} batches of {args.batch_size} "
            f"(--warmup_steps + --steps); use a bigger file or fewer steps"
        )
    src = [len(x) for x in dataset.input_ids]
    tgt = [len(x) for x in dataset.labels]
    grouped = LengthGroupedBatchSampler(dataset.lengths(), args.batch_size, seed=args.seed, group_by_length=True)
    random_ = LengthGroupedBatchSampler(dataset.lengths(), args.batch_size, seed=args.seed, group_by_length=False)
    epoch = [b for b in grouped.batches(0) if len(b) == args.batch_size]
    chosen = _representative_batches(epoch, dataset.lengths(), count)
    indices = [i for batch in chosen for i in batch]
    return Pool(
        input_ids=[dataset.input_ids[i] for i in indices],
        labels=[dataset.labels[i] for i in indices],
        dataset_input_ids=dataset.input_ids,
        dataset_labels=dataset.labels,
        epoch_padding_grouped=padding_fraction(grouped.batches(0), src, tgt),
        epoch_padding_random=padding_fraction(random_.batches(0), src, tgt),
        truncated_sources=stats.truncated_sources,
        rows=len(dataset),
    )
