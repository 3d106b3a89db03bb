"""Offline quick start: a synthetic dialogue dataset, a word-level tokenizer and a tiny random T5.

Nothing is downloaded. The assets are written as ordinary files (jsonl data, a ``from_pretrained`` model
directory), so the quick start goes through exactly the same loading, training, evaluation and saving code
as a real run on FLAN-T5 and DialogSum. The dialogues are generated from templates (no DialogSum text): each
summary is a fixed function of a few facts in the dialogue, so a model that learns shows it in ROUGE.
"""

from __future__ import annotations

import random
from pathlib import Path

from dialogsum.config import LAB_PROMPT
from dialogsum.files import read_rows, write_jsonl

NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Irene",
    "Jack",
    "Kate",
    "Leo",
    "Maria",
    "Nick",
    "Olivia",
    "Peter",
    "Rosa",
    "Sam",
    "Tina",
    "Victor",
]
PLACES = ["market", "library", "station", "park", "bank", "museum", "cinema", "hospital", "office", "airport"]
ITEMS = [
    "apples",
    "a ticket",
    "some books",
    "a bicycle",
    "new shoes",
    "a camera",
    "coffee",
    "flowers",
    "a phone",
    "bread",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["morning", "afternoon", "evening"]

# (dialogue template, summary template): the summary restates the dialogue's facts in a fixed pattern.
TEMPLATES = [
    (
        "#Person1#: Hi {name}, where are you going on {day}?\n#Person2#: I am going to the {place} to get {item}.\n"
        "#Person1#: In the {time}?\n#Person2#: Yes, in the {time}.",
        "{name} is going to the {place} on {day} {time} to get {item}.",
    ),
    (
        "#Person1#: {name}, can you help me on {day}?\n#Person2#: Sure, what do you need?\n"
        "#Person1#: I need {item} from the {place}.\n#Person2#: OK, I will bring it in the {time}.",
        "{name} will bring {item} from the {place} on {day} {time}.",
    ),
    (
        "#Person1#: I lost {item} at the {place}.\n#Person2#: Oh no. When was that?\n"
        "#Person1#: On {day}, in the {time}.\n#Person2#: Ask {name}, she works there.",
        "#Person1# lost {item} at the {place} on {day} {time} and should ask {name}.",
    ),
]

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5: pad doubles as decoder start


def synthetic_rows(count: int, seed: int, prefix: str) -> list[dict[str, str]]:
    """``count`` template dialogues with their summaries (columns fname, dialogue, summary, topic)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        dialogue_t, summary_t = TEMPLATES[index % len(TEMPLATES)]
        facts = {
            "name": rng.choice(NAMES),
            "place": rng.choice(PLACES),
            "item": rng.choice(ITEMS),
            "day": rng.choice(DAYS),
            "time": rng.choice(TIMES),
        }
        rows.append(
            {
                "fname": f"{prefix}_{index}",
                "dialogue": dialogue_t.format(**facts),
                "summary": summary_t.format(**facts),
                "topic": facts["place"],
            }
        )
    return rows


def write_synthetic_dataset(
    directory: str | Path, sizes: tuple[int, int, int] = (480, 48, 40), seed: int = 0
) -> dict[str, Path]:
    """Write train/validation/test jsonl files of synthetic dialogues; return their paths."""
    splits = zip(("train", "validation", "test"), sizes, strict=True)
    return {
        split: write_jsonl(Path(directory) / f"{split}.jsonl", synthetic_rows(size, seed + offset, split))
        for offset, (split, size) in enumerate(splits)
    }


def build_word_tokenizer(texts: list[str], directory: str | Path) -> Path:
    """Train a word-level tokenizer on ``texts`` (T5 special ids: pad 0, eos 1, unk 2) and save it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return Path(directory)


def build_tiny_t5(
    tokenizer_dir: str | Path, directory: str | Path, seed: int = 0, d_model: int = 64, num_layers: int = 2
) -> Path:
    """Save a tiny randomly initialised T5 (flan-t5 style: gated-gelu, untied lm_head) next to its tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from dialogsum.modeling import untie_lm_head

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = (len(tokenizer) + 7) // 8 * 8
    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=d_model * 2,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)  # transformers ties T5 heads on construction; FLAN-T5 checkpoints have their own
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def build_quickstart_assets(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Create (or reuse) the quick-start model directory and data directory under ``directory``.

    Returns ``(model_dir, data_dir)``; ``data_dir`` holds train/validation/test.jsonl.
    """
    root = Path(directory)
    model_dir, data_dir = root / "tiny-t5", root / "data"
    if (model_dir / "config.json").exists() and (data_dir / "test.jsonl").exists():
        return model_dir, data_dir
    paths = write_synthetic_dataset(data_dir, seed=seed)
    texts = [LAB_PROMPT]
    for path in paths.values():
        for row in read_rows(path):
            texts.extend([row["dialogue"], row["summary"]])
    tok_dir = build_word_tokenizer(texts, root / "tokenizer")
    build_tiny_t5(tok_dir, model_dir, seed=seed)
    return model_dir, data_dir
