"""Cross-version probe (run by tests/test_crossversion.py, in-process and under the floors' Python).

``build_folders`` writes, with this environment's dialogsum writers, every kind of folder the project saves for
an untied FLAN-T5-layout tiny model with the real FLAN-T5 tokenizer: the full model, a checkpoint, a LoRA adapter
(trained on a base given by a relative path) and its merged export. ``probe_folders`` loads folders as a user
would (``AutoModelForSeq2SeqLM``/``AutoTokenizer``/``PeftModel.from_pretrained``, the adapter on the base its
``adapter_config.json`` names) and reports logits, greedy predictions and tokenizer encodings.

As a script: ``python tests/crossversion.py TOKENIZER_DIR LOAD_ROOT SAVE_ROOT`` probes the folders under
LOAD_ROOT (written by the other environment), writes and probes its own under SAVE_ROOT, and prints one JSON
line: ``{"versions": ..., "loaded": ..., "saved": ...}``. Nothing here imports pytest.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

#: Folder name -> how it is loaded.
FOLDERS = {"full": "model", "checkpoint": "model", "adapter": "adapter", "merged": "model"}
#: A dialogue as the project's prompts hold them. (Text that spells a special token, e.g. "<extra_id_0>", is split
#: differently by transformers 4.x and 5.x whatever the files say: a change of the libraries, not of the folders.)
TEXT = "Summarize: #Person1#: Where is the train station? #Person2#: Two blocks north, then left."
DECODER_IDS = [[0, 37, 1782, 19, 8]]
#: Logits reported per decoder position: the first entries of the vocabulary, plus whole-vocabulary summaries.
SHOWN = 48


@contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _tiny_flan_t5(tokenizer: Any) -> torch.nn.Module:
    """FLAN-T5's layout (gated-gelu, untied lm_head, no output scaling) at width 32, random weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    from dialogsum.modeling import untie_lm_head

    config = T5Config(
        vocab_size=32128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)
    return model


def build_folders(root: Path, tokenizer_dir: str) -> None:
    """Write base/, full/, checkpoint/checkpoint-1/, adapter/ and merged/ under ``root`` with dialogsum's writers."""
    from accelerate import Accelerator

    from dialogsum.checkpointing import TrainState, save_checkpoint
    from dialogsum.config import LoraArguments, build_config
    from dialogsum.export import export_merged
    from dialogsum.modeling import apply_lora, load_model, load_tokenizer, save_model_files, write_model_folder

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    write_model_folder(_tiny_flan_t5(tokenizer), tokenizer, root / "base")
    accelerator = Accelerator(cpu=True)
    with _cwd(root):  # the base given relative to the working directory, as a user may type it
        full = accelerator.prepare(load_model("base"))
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # "trained": differs from the base everywhere
        save_model_files(accelerator, full, tokenizer, "full")
        cfg = build_config("full", {"model_name_or_path": "base", "output_dir": "checkpoint"})
        save_checkpoint(accelerator, Path("checkpoint"), TrainState(step=1), cfg, model=full, tokenizer=tokenizer)
        lora = apply_lora(load_model("base"), LoraArguments(lora_r=4, lora_alpha=8, lora_target_modules=["q", "v"]))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_()  # B starts at zero: make the adapter change the outputs
        save_model_files(accelerator, accelerator.prepare(lora), tokenizer, "adapter")
    export_merged(root / "adapter", root / "merged", str(root / "base"))


def _folder(root: Path, name: str) -> Path:
    return root / "checkpoint" / "checkpoint-1" if name == "checkpoint" else root / name


def probe_folders(root: Path) -> dict[str, Any]:
    """Load every folder of :func:`build_folders` under ``root`` as a user would; report what each computes."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    results = {}
    for name, kind in FOLDERS.items():
        folder = _folder(root, name)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if kind == "adapter":
            from peft import PeftModel

            base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(folder))
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(str(folder))
        results[name] = _outputs(model.eval(), tokenizer)
    return results


def _outputs(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    encoded = tokenizer([TEXT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded, decoder_input_ids=torch.tensor(DECODER_IDS)).logits[0].float()
        generated = model.generate(**encoded, max_new_tokens=8, num_beams=1, do_sample=False, min_new_tokens=8)
    return {
        "vocab": len(tokenizer),
        "input_ids": encoded["input_ids"][0].tolist(),
        "special_ids": sorted(set(tokenizer.all_special_ids)),
        "logits": [[round(float(v), 6) for v in row[:SHOWN]] for row in logits],
        "logsumexp": [round(float(v), 6) for v in torch.logsumexp(logits, dim=-1)],
        "argmax": logits.argmax(dim=-1).tolist(),
        "prediction_ids": generated[0].tolist(),
        "prediction": tokenizer.decode(generated[0], skip_special_tokens=True),
    }


def versions() -> dict[str, str]:
    """The versions of the libraries whose file formats are crossed."""
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


def main(argv: list[str]) -> None:
    """Probe the other environment's folders, then write and probe this one's; print the results as JSON."""
    tokenizer_dir, load_root, save_root = argv
    torch.set_num_threads(1)
    loaded = probe_folders(Path(load_root))
    build_folders(Path(save_root), tokenizer_dir)
    saved = probe_folders(Path(save_root))
    print("CROSSVERSION " + json.dumps({"versions": versions(), "loaded": loaded, "saved": saved}))


if __name__ == "__main__":
    main(sys.argv[1:])


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per folder: the largest logit difference (shown entries and log-sum-exp over the vocabulary) and whether
    the argmax tokens, greedy predictions, tokenizer sizes, encodings and special tokens are equal."""
    found = {}
    for name, want in expected.items():
        got = actual[name]
        pairs = [(a, b) for x, y in zip(want["logits"], got["logits"]) for a, b in zip(x, y)]
        pairs += list(zip(want["logsumexp"], got["logsumexp"]))
        found[name] = {
            "max_logit_diff": max(abs(a - b) for a, b in pairs),
            "same_argmax": want["argmax"] == got["argmax"],
            "same_prediction": [want["prediction_ids"], want["prediction"]]
            == [got["prediction_ids"], got["prediction"]],
            "same_tokenizer": all(want[k] == got[k] for k in ("vocab", "input_ids", "special_ids")),
        }
    return found
