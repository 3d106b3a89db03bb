"""Data: load DialogSum (hub id, saved dataset or local files), validate, prompt, tokenize, batch.

Everything here runs before a model is loaded, so bad input fails in seconds with one clear message.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dialogsum.config import DataArguments
from dialogsum.errors import UserError
from dialogsum.files import SUPPORTED_EXTENSIONS, describe_value, read_rows

__all__ = ["SUPPORTED_EXTENSIONS", "read_rows"]  # re-exported: file reading lives in dialogsum.files

logger = logging.getLogger(__name__)

_MULTI_REF = re.compile(r"^(?P<base>.+?)(?P<num>\d+)$")
_ID_SUFFIX = re.compile(r"_\d+$")

Row = dict[str, Any]


# --------------------------------------------------------------------------------------------- reading


def _summary_columns(columns: Sequence[str], summary_column: str) -> list[str]:
    """The reference columns: ``summary`` itself, or ``summary1, summary2, ...`` (official test format)."""
    if summary_column in columns:
        return [summary_column]
    numbered = []
    for name in columns:
        match = _MULTI_REF.match(name)
        if match and match.group("base") == summary_column:
            numbered.append((int(match.group("num")), name))
    return [name for _, name in sorted(numbered)]


def columns_of(rows: Sequence[Row]) -> list[str]:
    """Every column name found in any row, in order of first appearance (JSON rows may differ in keys)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _check_text_cells(row: Row, number: int, columns: Sequence[str], split: str, source: str) -> None:
    """A text cell holds text or nothing: a missing key or a number/boolean/object is refused, naming the row."""
    if not any(c in row for c in columns):
        raise UserError(
            f"{split} data {source}: row {number} has no {columns[0]!r} key (other rows have it); every row needs one"
        )
    for column in columns:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise UserError(
                f"{split} data {source}: row {number} has {describe_value(value)} in {column!r}, expected text"
            )


def validate_rows(rows: list[Row], args: DataArguments, split: str, source: str) -> list[Row]:
    """Check the columns and drop (or, with ``--strict``, refuse) rows with an empty dialogue or summary."""
    if not rows:
        raise UserError(f"{split} data {source} has no rows")
    columns = columns_of(rows)
    if args.text_column not in columns:
        raise UserError(
            f"{split} data {source} has no column {args.text_column!r} (columns: {', '.join(columns)});"
            f" set --text_column"
        )
    ref_columns = _summary_columns(columns, args.summary_column)
    if not ref_columns:
        raise UserError(
            f"{split} data {source} has no column {args.summary_column!r} (columns: "
            f"{', '.join(columns)}); set --summary_column"
        )
    kept: list[Row] = []
    empty = 0
    for number, row in enumerate(rows, start=1):
        _check_text_cells(row, number, [args.text_column], split, source)
        _check_text_cells(row, number, ref_columns, split, source)
        dialogue = row.get(args.text_column)
        refs = [row.get(c) for c in ref_columns]
        has_ref = any(isinstance(r, str) and r.strip() for r in refs)
        if not (isinstance(dialogue, str) and dialogue.strip()) or not has_ref:
            if args.strict:
                what = "dialogue" if not (isinstance(dialogue, str) and dialogue.strip()) else "summary"
                raise UserError(f"{split} data {source}: row {number} has an empty {what} (--strict)")
            empty += 1
            continue
        kept.append(row)
    if empty:
        logger.warning("%s: skipped %d row(s) with an empty dialogue or summary (use --strict to refuse)", split, empty)
    if not kept:
        raise UserError(f"{split} data {source}: no usable rows left after dropping {empty} empty row(s)")
    return kept


def subsample(rows: list[Row], limit: int | None) -> list[Row]:
    """First ``limit`` rows (deterministic, so a run can be reproduced exactly)."""
    return rows if limit is None else rows[:limit]


def _local_files(args: DataArguments) -> dict[str, str]:
    return {
        s: f
        for s, f in (("train", args.train_file), ("validation", args.validation_file), ("test", args.test_file))
        if f
    }


def check_data_sources(args: DataArguments, needed: Sequence[str]) -> None:
    """Cheap early check (no reading): local files exist with a known extension, or a hub id is reachable."""
    files = _local_files(args)
    if files:
        for split in needed:
            if split not in files:
                raise UserError(
                    f"no --{split}_file given (needed for {split}); local files: "
                    f"{', '.join(f'--{s}_file' for s in files)}"
                )
        for path in files.values():
            p = Path(path)
            if p.is_dir():
                raise UserError(f"data file is a directory, expected a file: {path}")
            if not p.is_file():
                raise UserError(f"data file not found: {path}")
            if p.suffix.lower() not in SUPPORTED_EXTENSIONS:
                raise UserError(
                    f"unsupported data file type {p.suffix or '(none)'} for {path}; use one of "
                    f"{', '.join(SUPPORTED_EXTENSIONS)}"
                )
        return
    if not args.dataset_name:
        raise UserError("no data: give --dataset_name or --train_file/--validation_file/--test_file")
    if not Path(args.dataset_name).exists():
        from dialogsum.hub import ensure_hub_reachable

        ensure_hub_reachable(args.dataset_name, "dataset", hint="--train_file/--validation_file/--test_file")


def load_splits(args: DataArguments, needed: Sequence[str]) -> dict[str, list[Row]]:
    """Load the requested splits as validated lists of rows (local files, a saved dataset, or the hub)."""
    check_data_sources(args, needed)
    files = _local_files(args)
    raw: dict[str, list[Row]] = {}
    if files:
        for split in needed:
            raw[split] = read_rows(files[split])
    else:
        raw = _load_dataset_splits(args, needed)
    out: dict[str, list[Row]] = {}
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": None}
    for split in needed:
        source = files.get(split, f"{args.dataset_name}[{split}]")
        rows = raw[split]
        if args.subsample_every:
            rows = rows[:: args.subsample_every]
        rows = validate_rows(rows, args, split, source)
        if split != "train":
            eval_examples(rows, args, source=f"{split} data {source}")  # ids checked now, before any model loads
        out[split] = subsample(rows, limits[split])
    return out


def _load_dataset_splits(args: DataArguments, needed: Sequence[str]) -> dict[str, list[Row]]:
    import datasets

    name = args.dataset_name or ""
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, args.dataset_config_name)
    except FileNotFoundError as exc:
        raise UserError(f"dataset {name!r} not found: {str(exc).splitlines()[0]}") from exc
    except (ConnectionError, OSError) as exc:
        raise UserError(
            f"could not load dataset {name!r}: {str(exc).splitlines()[0]}; use local files with "
            "--train_file/--validation_file/--test_file"
        ) from exc
    missing = [s for s in needed if s not in dataset]
    if missing:
        raise UserError(f"dataset {name!r} has no split(s) {', '.join(missing)} (has: {', '.join(dataset)})")
    return {split: dataset[split].to_list() for split in needed}


# --------------------------------------------------------------------------------------------- examples


def build_prompt(dialogue: str, template: str) -> str:
    """Put a dialogue into the prompt template (only ``{dialogue}`` is substituted)."""
    return template.format(dialogue=dialogue)


@dataclass
class EvalExample:
    """One unique dialogue with all of its reference summaries."""

    id: str
    dialogue: str
    references: list[str]


def eval_examples(
    rows: list[Row], args: DataArguments, limit: int | None = None, source: str = "evaluation data"
) -> list[EvalExample]:
    """Group rows into unique dialogues with all their references.

    Handles both forms of DialogSum's test set: the official one (one row per dialogue with ``summary1..3``)
    and the hub's flattened one (the same dialogue repeated on three rows, one summary each). Order is the
    order of first appearance; ``limit`` keeps the first N unique dialogues. Different dialogues sharing an id
    are refused (predictions are matched by id later, e.g. by ``compare.py``).
    """
    ref_columns = _summary_columns(columns_of(rows), args.summary_column)
    by_dialogue: dict[str, EvalExample] = {}
    for index, row in enumerate(rows):
        dialogue = row[args.text_column]
        refs: list[str] = []
        for column in ref_columns:
            value = row.get(column)
            if isinstance(value, str) and value.strip() and value.strip() not in refs:
                refs.append(value.strip())
        example_id = str(row[args.id_column]) if args.id_column in row else str(index)
        existing = by_dialogue.get(dialogue)
        if existing is None:
            if limit is not None and len(by_dialogue) >= limit:
                continue
            by_dialogue[dialogue] = EvalExample(id=example_id, dialogue=dialogue, references=refs)
            continue
        existing.references.extend(r for r in refs if r not in existing.references)
        # flattened rows of one dialogue may carry ids like test_0_1, test_0_2: keep the shared stem (test_0)
        stem_a, stem_b = _ID_SUFFIX.sub("", existing.id), _ID_SUFFIX.sub("", example_id)
        if existing.id != example_id and stem_a == stem_b:
            existing.id = stem_a
    examples = list(by_dialogue.values())
    first_with_id: dict[str, int] = {}
    for number, example in enumerate(examples, start=1):
        if example.id in first_with_id:
            raise UserError(
                f"{source}: dialogues {first_with_id[example.id]} and {number} are different but share the id "
                f"{example.id!r} (column {args.id_column!r}); give each dialogue its own id"
            )
        first_with_id[example.id] = number
    return examples


# --------------------------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizationStats:
    """How many rows were cut to fit ``--max_source_length`` / ``--max_target_length``."""

    rows: int
    truncated_sources: int
    truncated_targets: int
    source_tokens: int
    target_tokens: int

    def describe(self, split: str) -> str:
        """One log line."""
        return (
            f"{split}: {self.rows} rows, {self.truncated_sources} prompt(s) and {self.truncated_targets} "
            f"summary(ies) truncated; mean prompt {self.source_tokens / max(self.rows, 1):.0f} tokens"
        )


def _truncate(ids: list[int], max_length: int, eos_id: int | None) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if eos_id is not None and ids and ids[-1] == eos_id:
        return ids[: max_length - 1] + [eos_id]  # keep the end-of-sequence marker
    return ids[:max_length]


def check_prompt_fits(tokenizer: Any, args: DataArguments) -> int:
    """Refuse a ``--max_source_length`` that leaves no token for the dialogue; return the template's tokens.

    The template with an empty dialogue (plus the end-of-sequence token) must fit with room to spare, or every
    prompt would be cut to the template alone and the model would never see a dialogue.
    """
    template_tokens = len(tokenizer(build_prompt("", args.prompt_template), add_special_tokens=True)["input_ids"])
    if args.max_source_length <= template_tokens:
        raise UserError(
            f"--max_source_length {args.max_source_length} leaves no room for the dialogue: the prompt template "
            f"alone takes {template_tokens} tokens; use a --max_source_length well above {template_tokens} or a "
            "shorter --prompt_template"
        )
    return template_tokens


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Tokenize without padding, truncate to ``max_length`` (keeping EOS); return ids and the truncated count."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    truncated = sum(1 for x in ids if len(x) > max_length)
    return [_truncate(x, max_length, eos) for x in ids], truncated


class TokenizedDataset(Dataset):
    """Prompt token ids and label ids for training or loss evaluation (unpadded lists)."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def lengths(self) -> list[int]:
        """Prompt + label length of each example (what padding waste depends on)."""
        return [len(a) + len(b) for a, b in zip(self.input_ids, self.labels)]


def tokenize_rows(rows: list[Row], tokenizer: Any, args: DataArguments) -> tuple[TokenizedDataset, TokenizationStats]:
    """Turn rows into prompt/label ids (one example per row and reference; the first reference when several)."""
    check_prompt_fits(tokenizer, args)
    prompts = [build_prompt(r[args.text_column], args.prompt_template) for r in rows]
    ref_columns = _summary_columns(columns_of(rows), args.summary_column)
    summaries = [next(str(r[c]) for c in ref_columns if isinstance(r.get(c), str) and r[c].strip()) for r in rows]
    input_ids, cut_src = encode_texts(tokenizer, prompts, args.max_source_length)
    labels, cut_tgt = encode_texts(tokenizer, summaries, args.max_target_length)
    stats = TokenizationStats(
        rows=len(rows),
        truncated_sources=cut_src,
        truncated_targets=cut_tgt,
        source_tokens=sum(map(len, input_ids)),
        target_tokens=sum(map(len, labels)),
    )
    return TokenizedDataset(input_ids, labels), stats


class Seq2SeqCollator:
    """Dynamic padding to the longest example in the batch; labels padded with -100 (ignored by the loss).

    Also returns ``num_tokens``: the real (non-pad) prompt + label tokens, for throughput accounting.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, seqs: Sequence[Sequence[int]]) -> int:
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        return width

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        sources = [f["input_ids"] for f in features]
        targets = [f["labels"] for f in features]
        src_w, tgt_w = self._width(sources), self._width(targets)
        input_ids = torch.full((len(features), src_w), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(features), src_w), dtype=torch.long)
        labels = torch.full((len(features), tgt_w), -100, dtype=torch.long)
        for i, (s, t) in enumerate(zip(sources, targets)):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention[i, : len(s)] = 1
            labels[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        real = sum(len(s) + len(t) for s, t in zip(sources, targets))
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "num_tokens": torch.tensor(real, dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------- batching


class LengthGroupedBatchSampler:
    """Training batches: every example exactly once per epoch, order fixed by (seed, epoch).

    With ``group_by_length`` the indices are shuffled, cut into mega-chunks of ``batch_size * mega_batches``,
    sorted by length inside each chunk, cut into batches, and the batches shuffled: batches hold examples of
    similar length (little padding) yet arrive in random order. Without it: plain random batches.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True, mega_batches: int = 50
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order :meth:`__iter__` gives (accelerate's prepared loader calls this too)."""
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        chunk = self.batch_size * self.mega_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            block = sorted(order[start : start + chunk], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(block[i : i + self.batch_size] for i in range(0, len(block), self.batch_size))
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def padding_fraction(
    batches: Sequence[Sequence[int]], source_lengths: Sequence[int], target_lengths: Sequence[int]
) -> float:
    """Share of padded positions (source + target) over a set of batches under dynamic padding."""
    padded = real = 0
    for batch in batches:
        src = [source_lengths[i] for i in batch]
        tgt = [target_lengths[i] for i in batch]
        padded += len(batch) * (max(src) + max(tgt))
        real += sum(src) + sum(tgt)
    return 1.0 - real / padded if padded else 0.0
