"""Data: prompt text, file formats, validation, truncation counts, -100 labels, grouped batches, multi-ref."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from dialogsum.config import DataArguments
from dialogsum.data import (
    LengthGroupedBatchSampler,
    PadWidths,
    Seq2SeqCollator,
    TokenBudget,
    bucket_widths,
    build_prompt,
    check_prompt_fits,
    eval_examples,
    load_splits,
    padding_fraction,
    read_rows,
    tokenize_rows,
)
from dialogsum.errors import UserError

ROWS = [
    {"fname": "a", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "x"},
    {"fname": "b", "dialogue": "#Person1#: Tea?\n#Person2#: Yes, please.", "summary": "One wants tea.", "topic": "y"},
]


def test_prompt_is_the_labs_exactly() -> None:
    args = DataArguments()
    assert build_prompt("#Person1#: Hi.", args.prompt_template) == (
        "Summarize the following conversation.\n\n#Person1#: Hi.\n\nSummary: "
    )
    assert build_prompt("braces {x} stay", "D: {dialogue}") == "D: braces {x} stay"


def _write_all_formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths["json"].write_text(json.dumps(rows), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def test_every_format_reads_the_same_rows(tmp_path: Path) -> None:
    for kind, path in _write_all_formats(tmp_path, ROWS).items():
        assert read_rows(path) == ROWS, kind


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.jsonl", "data file not found"),
        (b"", "empty.jsonl", "data file is empty"),
        (b"a,b\n", "data.txt", "unsupported data file type .txt"),
        (b'{"dialogue": "caf\xe9"}\n', "latin1.jsonl", "is not UTF-8 text (bad byte at line 1)"),
        (b'{"dialogue": "x"}\n{oops\n', "broken.jsonl", "line 2 is not valid JSON"),
    ],
)
def test_bad_files_get_one_clear_message(tmp_path: Path, content: bytes | None, name: str, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=None) as info:
        read_rows(path)
    assert message in str(info.value)


def test_columns_and_empty_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [*ROWS, {"fname": "c", "dialogue": "  ", "summary": "s"}, {"fname": "d", "dialogue": "x", "summary": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_splits(DataArguments(train_file=str(path)), ["train"])["train"]
    assert [r["fname"] for r in loaded] == ["a", "b"]  # the two empty rows are skipped (and counted in the log)
    with pytest.raises(UserError, match="row 3 has an empty dialogue"):
        load_splits(DataArguments(train_file=str(path), strict=True), ["train"])
    with pytest.raises(UserError, match="has no column 'text'"):
        load_splits(DataArguments(train_file=str(path), text_column="text"), ["train"])
    with pytest.raises(UserError, match="no --test_file given"):
        load_splits(DataArguments(train_file=str(path)), ["train", "test"])


def test_lab_subsample_is_reproducible(tmp_path: Path) -> None:
    # the lab keeps rows whose index is a multiple of 100: 12,460 / 500 / 1,500 rows -> 125 / 5 / 15
    for split, n, expected in (("train", 12460, 125), ("validation", 500, 5), ("test", 1500, 15)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"dialogue": f"d{i}", "summary": f"s{i}"}) + "\n" for i in range(n)))
        args = DataArguments(**{f"{split}_file": str(path)}, subsample_every=100)
        rows = load_splits(args, [split])[split]
        assert len(rows) == expected
        assert [r["dialogue"] for r in rows[:3]] == ["d0", "d100", "d200"]


def test_truncation_is_counted_and_labels_masked(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    long_dialogue = " ".join(["Alice is going to the market ."] * 40)
    rows = [*ROWS, {"dialogue": long_dialogue, "summary": "Alice goes to the market on Monday morning ."}]
    args = DataArguments(max_source_length=32, max_target_length=6)
    dataset, stats = tokenize_rows(rows, tokenizer, args)
    assert stats.rows == 3
    assert stats.truncated_sources == 1
    assert stats.truncated_targets == 1
    assert len(dataset.input_ids[2]) == 32 and dataset.input_ids[2][-1] == tokenizer.eos_token_id
    assert len(dataset.labels[2]) == 6 and dataset.labels[2][-1] == tokenizer.eos_token_id

    batch = Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id)([dataset[0], dataset[2]])
    short_label = len(dataset.labels[0])
    assert batch["labels"].shape == (2, 6)
    assert (batch["labels"][0, short_label:] == -100).all()  # padding never counts in the loss
    assert (batch["labels"][0, :short_label] >= 0).all()
    assert batch["attention_mask"][0].sum().item() == len(dataset.input_ids[0])
    assert (batch["input_ids"][0, len(dataset.input_ids[0]) :] == tokenizer.pad_token_id).all()
    real = len(dataset.input_ids[0]) + len(dataset.input_ids[2]) + short_label + 6
    assert batch["num_tokens"].item() == real


def _dialogsum_like_lengths(n: int, seed: int) -> list[int]:
    # prompt mean ~230 tokens with a long tail (p95 ~410), summary mean ~39: DialogSum's measured shape
    rng = random.Random(seed)
    return [int(min(max(rng.lognormvariate(5.35, 0.38), 60), 800)) + int(max(rng.gauss(39, 15), 8)) for _ in range(n)]


def test_grouped_sampler_covers_every_index_once_and_is_seeded() -> None:
    lengths = _dialogsum_like_lengths(1003, seed=1)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=7)
    epoch0 = sampler.batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(1003))
    assert len(epoch0) == len(sampler) == 126
    assert epoch0 == LengthGroupedBatchSampler(lengths, batch_size=8, seed=7).batches(0)
    assert epoch0 != sampler.batches(1)  # a new order every epoch
    assert epoch0 != LengthGroupedBatchSampler(lengths, batch_size=8, seed=8).batches(0)
    sampler.set_epoch(1)
    assert list(sampler) == sampler.batches(1)
    # batches come in random order, not sorted by length
    first_lengths = [max(lengths[i] for i in b) for b in epoch0[:20]]
    assert first_lengths != sorted(first_lengths, reverse=True)


def test_grouping_cuts_padding_versus_random_batches() -> None:
    src = _dialogsum_like_lengths(2000, seed=3)
    tgt = [max(8, int(x * 0.15)) for x in src]
    lengths = [a + b for a, b in zip(src, tgt)]
    grouped = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0).batches(0)
    shuffled = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, group_by_length=False).batches(0)
    grouped_waste = padding_fraction(grouped, src, tgt)
    random_waste = padding_fraction(shuffled, src, tgt)
    assert random_waste > 0.2
    assert grouped_waste < 0.05
    assert grouped_waste < random_waste / 5


def test_grouping_on_real_dialogsum(dialogsum_dev: Path, flan_t5_base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(flan_t5_base_dir))
    rows = read_rows(dialogsum_dev)
    dataset, stats = tokenize_rows(rows, tokenizer, DataArguments())
    assert stats.rows == 500 and stats.truncated_sources == 8  # 8 of 500 prompts are over 512 tokens
    src = [len(x) for x in dataset.input_ids]
    tgt = [len(x) for x in dataset.labels]
    grouped = LengthGroupedBatchSampler(dataset.lengths(), batch_size=8, seed=0).batches(0)
    shuffled = LengthGroupedBatchSampler(dataset.lengths(), batch_size=8, seed=0, group_by_length=False).batches(0)
    assert padding_fraction(grouped, src, tgt) < 0.1 < 0.3 < padding_fraction(shuffled, src, tgt)


def test_official_and_flattened_test_sets_give_the_same_examples() -> None:
    official = [
        {"fname": "test_0", "dialogue": "D0", "summary1": "a", "summary2": "b", "summary3": "c", "topic1": "t"},
        {"fname": "test_1", "dialogue": "D1", "summary1": "d", "summary2": "e", "summary3": "f", "topic1": "t"},
    ]
    flattened = [
        {"fname": f"test_{i}_{j}", "dialogue": f"D{i}", "summary": s, "topic": "t"}  # hub-style row ids
        for i, refs in enumerate((("a", "b", "c"), ("d", "e", "f")))
        for j, s in enumerate(refs, start=1)
    ]
    args = DataArguments()
    a, b = eval_examples(official, args), eval_examples(flattened, args)
    assert [(e.id, e.dialogue, e.references) for e in a] == [(e.id, e.dialogue, e.references) for e in b]
    assert a[1].references == ["d", "e", "f"]
    assert len(eval_examples(flattened, args, limit=1)) == 1


def test_csv_rows_must_match_the_header(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text('dialogue,summary\n"#Person1#: Hi,\nthere.",greeting\n\n"b",c\n')
    assert read_rows(good) == [
        {"dialogue": "#Person1#: Hi,\nthere.", "summary": "greeting"},
        {"dialogue": "b", "summary": "c"},
    ]
    semicolon = tmp_path / "semicolon.csv"
    semicolon.write_text("dialogue;summary\nhi, there;a greeting\n")
    with pytest.raises(UserError, match=r"line 2 has 2 field\(s\) but the header has 1 \(it looks separated"):
        read_rows(semicolon)
    short = tmp_path / "short.csv"
    short.write_text('dialogue,summary,topic\na,b,c\n"d\ne",f\n')
    with pytest.raises(UserError, match=r"short.csv: line 4 has 2 field\(s\) but the header has 3$"):
        read_rows(short)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"fname": "c", "dialogue": 42, "summary": "s"}, "row 3 has a number (42) in 'dialogue', expected text"),
        ({"fname": "c", "dialogue": "d", "summary": False}, "row 3 has a boolean (false) in 'summary', expected text"),
        ({"fname": "c", "dialogue": ["a"], "summary": "s"}, "row 3 has a list in 'dialogue', expected text"),
        ({"fname": "c", "summary": "s"}, "row 3 has no 'dialogue' key (other rows have it)"),
    ],
)
def test_cells_that_are_not_text_are_named(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, row]))
    with pytest.raises(UserError, match=None) as info:
        load_splits(DataArguments(train_file=str(path)), ["train"])
    assert message in str(info.value)


def test_a_column_missing_from_the_first_row_only_is_found(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"fname": "z", "summary": "s"}, *ROWS]))
    with pytest.raises(UserError, match="row 1 has no 'dialogue' key"):
        load_splits(DataArguments(train_file=str(path)), ["train"])


def test_different_dialogues_may_not_share_an_id(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({**r, "fname": "same"}) + "\n" for r in ROWS))
    with pytest.raises(UserError, match="dialogues 1 and 2 are different but share the id 'same'"):
        load_splits(DataArguments(test_file=str(path)), ["test"])
    load_splits(DataArguments(train_file=str(path)), ["train"])  # training rows are not matched by id


def test_the_prompt_template_must_leave_room_for_a_dialogue(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    args = DataArguments(max_source_length=64)
    template = check_prompt_fits(tokenizer, args)
    tight = DataArguments(max_source_length=template)
    with pytest.raises(UserError, match=f"--max_source_length {template} leaves no room for the dialogue"):
        tokenize_rows(ROWS, tokenizer, tight)
    assert check_prompt_fits(tokenizer, DataArguments(max_source_length=template + 1)) == template


# --------------------------------------------------------------------------------------------- length buckets


def test_bucket_widths_are_few_and_end_at_the_truncation_length() -> None:
    assert bucket_widths(512) == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert bucket_widths(128) == (16, 24, 32, 48, 64, 96, 128)
    assert bucket_widths(100) == (16, 24, 32, 48, 64, 96, 100)
    assert bucket_widths(12) == (12,)
    widths = PadWidths.bucketed(512, 128)
    assert [widths.source(n) for n in (1, 16, 17, 230, 257, 512)] == [16, 16, 24, 256, 384, 512]
    assert widths.target(39) == 48 and widths.target(600) == 600  # longer than the last bucket: as it is
    assert PadWidths().source(230) == 230  # no buckets: the longest example
    assert widths.padded_tokens(8, 230, 39) == 8 * (256 + 48)


def test_bucketed_batches_pad_with_minus_100_and_mask_0(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    dataset, _ = tokenize_rows(ROWS, tokenizer, DataArguments(max_source_length=96, max_target_length=32))
    batch = Seq2SeqCollator(tokenizer.pad_token_id, PadWidths.bucketed(96, 32))([dataset[0], dataset[1]])
    plain = Seq2SeqCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    src, tgt = plain["input_ids"].shape[1], plain["labels"].shape[1]
    assert batch["input_ids"].shape[1] == PadWidths.bucketed(96, 32).source(src) > src
    assert batch["labels"].shape[1] == PadWidths.bucketed(96, 32).target(tgt) > tgt
    # the extra columns are pure padding: pad ids, attention 0, labels -100; the rest is the plain batch
    assert torch.equal(batch["input_ids"][:, :src], plain["input_ids"])
    assert (batch["input_ids"][:, src:] == tokenizer.pad_token_id).all()
    assert (batch["attention_mask"][:, src:] == 0).all()
    assert (batch["labels"][:, tgt:] == -100).all() and torch.equal(batch["labels"][:, :tgt], plain["labels"])
    assert batch["num_tokens"] == plain["num_tokens"]


def test_bucket_padding_never_enters_the_loss(tiny_model_dir: Path, synthetic_data_dir: Path) -> None:
    """The same examples with and without bucket padding: the same loss and gradients (fp32 rounding only)."""
    from transformers import AutoModelForSeq2SeqLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = read_rows(synthetic_data_dir / "train.jsonl")[:8]
    dataset, _ = tokenize_rows(rows, tokenizer, DataArguments(max_source_length=96, max_target_length=32))
    features = [dataset[i] for i in range(8)]
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))
    model.config.dropout_rate = 0.0
    model.train()

    def loss_and_grads(widths: PadWidths) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = Seq2SeqCollator(tokenizer.pad_token_id, widths)(features)
        batch.pop("num_tokens")
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads(PadWidths())
    bucket_loss, bucket_grads = loss_and_grads(PadWidths(source_buckets=(96,), target_buckets=(32,)))
    torch.testing.assert_close(bucket_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(bucket_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- token budgets


def _budget_sampler(max_tokens: int, seed: int = 7, widths: PadWidths | None = None, grouped: bool = True):
    src = _dialogsum_like_lengths(1003, seed=1)
    tgt = [max(8, int(x * 0.15)) for x in src]
    src = [min(x, 512) for x in src]
    tgt = [min(x, 128) for x in tgt]
    budget = TokenBudget(max_tokens, src, tgt, widths or PadWidths())
    lengths = [a + b for a, b in zip(src, tgt)]
    return LengthGroupedBatchSampler(lengths, 8, seed=seed, group_by_length=grouped, budget=budget), src, tgt


@pytest.mark.parametrize("widths", [PadWidths(), PadWidths.bucketed(512, 128)], ids=["longest", "buckets"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "random"])
def test_token_budget_batches_cover_every_example_once_within_the_budget(widths: PadWidths, grouped: bool) -> None:
    sampler, src, tgt = _budget_sampler(16384, widths=widths, grouped=grouped)
    for epoch in (0, 1):
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(1003))
        costs = [widths.padded_tokens(len(b), max(src[i] for i in b), max(tgt[i] for i in b)) for b in batches]
        assert max(costs) <= 16384
        # greedy: a batch was closed because the next example did not fit (or the chunk/epoch ended)
        assert sum(costs) / len(costs) > 0.75 * 16384
        assert sampler.num_batches(epoch) == len(batches)
    assert sampler.batch_size is None  # accelerate's sharder then accepts batches of any size
    sizes = [len(b) for b in sampler.batches(0)]
    assert min(sizes) < max(sizes)  # short examples ride in bigger batches
    if grouped and widths == PadWidths():
        assert padding_fraction(sampler.batches(0), src, tgt) < 0.05  # still length-grouped


def test_token_budget_batches_are_what_the_collator_builds(tiny_model_dir: Path, synthetic_data_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = read_rows(synthetic_data_dir / "train.jsonl")
    dataset, _ = tokenize_rows(rows, tokenizer, DataArguments(max_source_length=96, max_target_length=32))
    widths = PadWidths.bucketed(96, 32)
    src, tgt = [len(x) for x in dataset.input_ids], [len(x) for x in dataset.labels]
    sampler = LengthGroupedBatchSampler(dataset.lengths(), 8, seed=0, budget=TokenBudget(1024, src, tgt, widths))
    collator = Seq2SeqCollator(tokenizer.pad_token_id, widths)
    for indices in sampler.batches(0):
        batch = collator([dataset[i] for i in indices])
        assert batch["input_ids"].numel() + batch["labels"].numel() <= 1024


def test_token_budget_order_is_seeded_per_epoch() -> None:
    sampler, _, _ = _budget_sampler(16384)
    epoch0 = sampler.batches(0)
    assert epoch0 == _budget_sampler(16384)[0].batches(0)
    assert epoch0 != sampler.batches(1) and epoch0 != _budget_sampler(16384, seed=8)[0].batches(0)
    sampler.set_epoch(1)
    assert list(sampler) == sampler.batches(1) and len(sampler) == len(sampler.batches(1))
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


def test_token_budget_refuses_an_example_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match="an example takes 640 padded tokens, more than max_tokens=600"):
        TokenBudget(600, [512, 10], [128, 5])


def test_token_budget_batches_shard_over_processes_like_accelerate() -> None:
    """accelerate's sharder, given batches of different sizes (batch_size None): each process gets the same
    number of batches, together every batch of the epoch (the last round topped up from the first batches)."""
    from accelerate.data_loader import BatchSamplerShard

    sampler, _, _ = _budget_sampler(16384)
    batches = sampler.batches(0)
    world = 3
    shards = [list(BatchSamplerShard(sampler, world, rank)) for rank in range(world)]
    per_process = -(-len(batches) // world)
    assert [len(s) for s in shards] == [per_process] * world
    assert [len(BatchSamplerShard(sampler, world, rank)) for rank in range(world)] == [per_process] * world
    dealt = [shards[i % world][i // world] for i in range(len(batches))]
    assert dealt == batches  # round robin, in order, nothing lost
