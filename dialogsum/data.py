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

from dialogsum.config import DataArguments, warn_once
from dialogsum.errors import UserError
from dialogsum.files import SUPPORTED_EXTENSIONS, check_table_input, describe_value, read_rows

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
            check_table_input(path)  # a file or a pipe (left unread) whose name, if any, says a table format
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
        read: dict[str, list[Row]] = {}  # one path for two splits is read once (a pipe can be read only once)
        for split in needed:
            if files[split] not in read:
                read[files[split]] = read_rows(files[split])
            raw[split] = read[files[split]]
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
    if "train" in out:
        warn_shared_dialogues(out, args.text_column)
    return out


def warn_shared_dialogues(splits: dict[str, list[Row]], text_column: str) -> None:
    """Warn (main process) when evaluation dialogues also appear in the training data, by content (white space
    aside): their scores would measure memory, not summarization."""
    seen = {" ".join(str(row[text_column]).split()) for row in splits["train"]}
    for split in ("validation", "test"):
        if split not in splits:
            continue
        dialogues = {" ".join(str(row[text_column]).split()) for row in splits[split]}
        shared = len(dialogues & seen)
        if shared:
            warn_once(
                f"{shared} of the {len(dialogues)} {split} dialogues also appear in the training data (same text): "
                f"{split} scores on them measure memory, not summarization"
            )


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


def bucket_widths(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """The widths a padded dimension may take: powers of two from ``smallest`` and the midpoints 1.5x between
    them (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512), below ``max_length``, then ``max_length`` itself.

    Rounding a width up to the next bucket wastes at most a third of it; a compiled model sees a handful of
    shapes instead of one per batch (with CUDA graphs, one recorded graph per shape).
    """
    widths: list[int] = []
    power = smallest
    while power < max_length:
        widths.extend(w for w in (power, power * 3 // 2) if w < max_length)
        power *= 2
    return (*widths, max_length)


@dataclass(frozen=True)
class PadWidths:
    """How wide a batch is padded: to its longest prompt and summary, or up to the next length bucket.

    Empty buckets (the default) mean dynamic padding to the longest example. Both the collator (which pads)
    and the token-budget sampler (which must know the padded size of a batch before it exists) use this.
    """

    source_buckets: tuple[int, ...] = ()
    """Allowed prompt widths, ascending (empty: the longest prompt of the batch)."""
    target_buckets: tuple[int, ...] = ()
    """Allowed summary widths, ascending (empty: the longest summary of the batch)."""

    @classmethod
    def bucketed(cls, max_source_length: int, max_target_length: int) -> PadWidths:
        """Length buckets up to the truncation lengths (see :func:`bucket_widths`)."""
        return cls(bucket_widths(max_source_length), bucket_widths(max_target_length))

    @staticmethod
    def _round(longest: int, buckets: tuple[int, ...]) -> int:
        # a width above the last bucket (a sequence longer than the truncation length) stays as it is
        return next((b for b in buckets if b >= longest), longest)

    def source(self, longest: int) -> int:
        """Padded prompt width of a batch whose longest prompt has ``longest`` tokens."""
        return self._round(longest, self.source_buckets)

    def target(self, longest: int) -> int:
        """Padded summary width of a batch whose longest summary has ``longest`` tokens."""
        return self._round(longest, self.target_buckets)

    def padded_tokens(self, examples: int, longest_source: int, longest_target: int) -> int:
        """Positions of a padded batch: examples x (prompt width + summary width)."""
        return examples * (self.source(longest_source) + self.target(longest_target))


class Seq2SeqCollator:
    """Pads a batch to its longest example (or up to a length bucket, see :class:`PadWidths`); labels padded
    with -100 and prompts with attention mask 0, so padding never enters the loss.

    Also returns ``num_tokens``: the real (non-pad) prompt + label tokens, for throughput accounting.
    """

    def __init__(self, pad_token_id: int, widths: PadWidths | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.widths = widths or PadWidths()

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        sources = [f["input_ids"] for f in features]
        targets = [f["labels"] for f in features]
        src_w = self.widths.source(max(len(s) for s in sources))
        tgt_w = self.widths.target(max(len(t) for t in targets))
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


@dataclass(frozen=True)
class TokenBudget:
    """Batches of as many examples as fit ``max_tokens`` padded positions (fairseq's ``--max-tokens``).

    The cost of a batch is what the collator will build: examples x (padded prompt width + padded summary
    width), with the same :class:`PadWidths`. Every single example must fit.
    """

    max_tokens: int
    """Padded prompt + summary positions allowed per batch."""
    source_lengths: Sequence[int]
    """Prompt tokens of each example."""
    target_lengths: Sequence[int]
    """Summary tokens of each example."""
    widths: PadWidths = PadWidths()
    """How the collator pads (buckets or not)."""

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError("max_tokens must be positive")
        if len(self.source_lengths) != len(self.target_lengths):
            raise ValueError("source_lengths and target_lengths differ in length")
        if self.source_lengths:
            largest = max(self.widths.padded_tokens(1, s, t) for s, t in zip(self.source_lengths, self.target_lengths))
            if largest > self.max_tokens:
                raise ValueError(f"an example takes {largest} padded tokens, more than max_tokens={self.max_tokens}")

    def pack(self, order: Sequence[int]) -> list[list[int]]:
        """Cut ``order`` into consecutive batches, each as long as the budget allows."""
        batches: list[list[int]] = []
        batch: list[int] = []
        longest_src = longest_tgt = 0
        for index in order:
            src = max(longest_src, self.source_lengths[index])
            tgt = max(longest_tgt, self.target_lengths[index])
            if batch and self.widths.padded_tokens(len(batch) + 1, src, tgt) > self.max_tokens:
                batches.append(batch)
                batch, src, tgt = [], self.source_lengths[index], self.target_lengths[index]
            batch.append(index)
            longest_src, longest_tgt = src, tgt
        if batch:
            batches.append(batch)
        return batches


class LengthGroupedBatchSampler:
    """Training batches: every example exactly once per epoch, order fixed by (seed, epoch).

    With ``group_by_length`` the indices are shuffled, cut into mega-chunks of ``mega_batches`` batches, sorted
    by length inside each chunk, cut into batches, and the batches shuffled: batches hold examples of similar
    length (little padding) yet arrive in random order. Without it: plain random batches.

    Batches hold ``batch_size`` examples (the last one of an epoch fewer), or, with a :class:`TokenBudget`, as
    many as fit its padded-token budget: many short examples or a few long ones, so that each batch does about
    the same work. Their number then varies a little from epoch to epoch (:meth:`num_batches`), and
    ``batch_size`` is None, which tells accelerate's sharder that batches differ in size.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        mega_batches: int = 50,
        budget: TokenBudget | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if budget is not None and len(budget.source_lengths) != len(lengths):
            raise ValueError("the token budget's lengths do not match the sampler's")
        self.lengths = list(lengths)
        self.budget = budget
        self.batch_size: int | None = None if budget is not None else batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batches = mega_batches
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None
        # examples per mega-chunk: mega_batches batches of the fixed size, or of the budget's mean batch
        mean_length = sum(self.lengths) / max(len(self.lengths), 1)
        per_batch = batch_size if budget is None else max(1, int(budget.max_tokens // max(mean_length, 1)))
        self.chunk = per_batch * mega_batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order :meth:`__iter__` gives (accelerate's prepared loader calls this too)."""
        self.epoch = epoch

    def _cut(self, order: list[int]) -> list[list[int]]:
        if self.budget is not None:
            return self.budget.pack(order)
        size = self.batch_size or 1
        return [order[i : i + size] for i in range(0, len(order), size)]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._cached is not None and self._cached[0] == epoch:
            return [list(b) for b in self._cached[1]]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            batches = self._cut(order)
        else:
            batches = []
            for start in range(0, len(order), self.chunk):
                block = sorted(order[start : start + self.chunk], key=lambda i: self.lengths[i], reverse=True)
                batches.extend(self._cut(block))
            permutation = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in permutation]
        self._cached = (epoch, batches)
        return [list(b) for b in batches]

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches in an epoch (all processes together); with a token budget it varies by epoch."""
        if self.budget is None:
            return math.ceil(len(self.lengths) / (self.batch_size or 1))
        return len(self.batches(epoch))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return self.num_batches()


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
