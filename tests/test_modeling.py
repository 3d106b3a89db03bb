"""Modeling: LoRA parameter count on the real flan-t5-base shape, adapter and full save/load round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from dialogsum.config import LoraArguments
from dialogsum.errors import UserError
from dialogsum.modeling import (
    apply_lora,
    check_model_source,
    load_adapter,
    load_for_inference,
    load_model,
    model_from_config,
    parameter_report,
    save_model,
    untie_lm_head,
)

# google/flan-t5-base's config.json, written out so the test runs on a fresh clone without ../shared
FLAN_T5_BASE = dict(
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=2048,
    num_layers=12,
    num_decoder_layers=12,
    num_heads=12,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)


def _flan_t5_base_on_meta() -> torch.nn.Module:
    with torch.device("meta"):  # the real shapes without allocating ~1 GB
        model = T5ForConditionalGeneration(T5Config(**FLAN_T5_BASE))
        untie_lm_head(model)  # the released checkpoint has its own lm_head
    return model


def test_lora_on_flan_t5_base_has_the_labs_trainable_count() -> None:
    model = apply_lora(_flan_t5_base_on_meta(), LoraArguments())
    report = parameter_report(model)
    assert report["trainable_params"] == 3_538_944
    assert report["total_params"] == 247_577_856 + 3_538_944
    assert report["trainable_percent"] == pytest.approx(1.41, abs=0.005)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 2 * (12 * 1 + 12 * 2)  # q and v, A and B, encoder self + decoder self/cross


def test_real_config_gives_untied_checkpoint_size(flan_t5_base_dir: Path) -> None:
    model = model_from_config(str(flan_t5_base_dir))
    assert parameter_report(model)["total_params"] == 247_577_856
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()


def _perturb_lora(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # lora_B starts at zero: make the adapter actually change outputs


def test_adapter_save_then_load_reproduces_generations(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))
    model = apply_lora(base, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    _perturb_lora(model)
    model.eval()
    inputs = tokenizer(["#Person1#: Hi Alice , where are you going on Monday ?"], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=12, num_beams=1, do_sample=False)
    decoder = torch.tensor([[0, 5, 9, 13]])
    with torch.no_grad():
        expected_logits = model(**inputs, decoder_input_ids=decoder).logits

    accelerator = Accelerator(cpu=True)
    size = save_model(accelerator, model, tokenizer, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert 0 < size < 1.0

    reloaded = load_for_inference(str(tiny_model_dir), str(tmp_path / "adapter"))
    assert parameter_report(reloaded)["trainable_params"] == 0
    again = reloaded.generate(**inputs, max_new_tokens=12, num_beams=1, do_sample=False)
    assert torch.equal(expected, again)
    with torch.no_grad():
        # the library's loader runs the fused tanh-GELU (same function, rounding differs in the 6th decimal)
        # (measured 2.1e-5 on logits of magnitude ~15; the adapter's own effect below is > 1e-2)
        got = reloaded(**inputs, decoder_input_ids=decoder).logits
        assert torch.allclose(got, expected_logits, atol=1e-4)
        plain = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))(**inputs, decoder_input_ids=decoder).logits
    assert (plain - expected_logits).abs().max() > 1e-2  # the adapter really matters


def test_full_model_keeps_its_own_lm_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir))
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # as built: its own head
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # training moved the head
    save_model(Accelerator(cpu=True), model, tokenizer, tmp_path / "full")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "full"))
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.shared.weight, model.shared.weight)


def test_bad_model_and_adapter_paths(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UserError, match="not a seq2seq"):
        check_model_source(str(tmp_path / "gpt"))
    with pytest.raises(UserError, match="directory not found"):
        check_model_source(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir)), str(tmp_path))
    with pytest.raises(UserError, match="--lora_target_modules"):
        apply_lora(
            AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir)), LoraArguments(lora_target_modules=["qq"])
        )


def _copy_with_weights(source: Path, target: Path, change) -> Path:
    """A copy of the model folder ``source`` whose weights are ``change(tensors)``."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, target)
    tensors = load_file(str(source / "model.safetensors"))
    save_file(change(dict(tensors)), str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_weights_that_do_not_match_the_config_are_refused_naming_the_tensors(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def drop_block_1(t):
        return {k: v for k, v in t.items() if ".block.1." not in k}

    def add_one(t):
        return {**t, "decoder.extra_head.weight": torch.zeros(3)}

    def reshape_norm(t):
        return {**t, "decoder.final_layer_norm.weight": torch.ones(7)}

    dropped = len(load_file(str(tiny_model_dir / "model.safetensors"))) - len(
        drop_block_1(load_file(str(tiny_model_dir / "model.safetensors")))
    )
    missing = _copy_with_weights(tiny_model_dir, tmp_path / "missing", drop_block_1)
    with pytest.raises(UserError) as error:
        load_model(str(missing))
    message = str(error.value)
    assert message.startswith(f"the weights of {missing} do not match its config.json: tensors {dropped} missing (")
    assert "decoder.block.1.layer.0.SelfAttention.k.weight" in message and f"({dropped - 5} more)" in message
    assert "\n" not in message

    extra = _copy_with_weights(tiny_model_dir, tmp_path / "extra", add_one)
    with pytest.raises(UserError, match=r"tensors 1 unexpected \(decoder\.extra_head\.weight\);"):
        load_model(str(extra))

    shape = _copy_with_weights(tiny_model_dir, tmp_path / "shape", reshape_norm)
    with pytest.raises(UserError) as error:
        load_model(str(shape))
    assert "tensors 1 of another shape (decoder.final_layer_norm.weight [7] in the file vs [64] in the config)" in str(
        error.value
    )
    load_model(str(tiny_model_dir))  # the folder as saved loads


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"model_type": "t5", "d_model": 64', "is not valid JSON (Expecting ',' delimiter at line 1)"),
        ("[1, 2]", "must hold a JSON object, but holds a list"),
        ('{"model_type": "t5", "is_encoder_decoder": true, "d_model": "wide"}', "is not a valid model config: "),
    ],
    ids=["cut-short", "list", "wrong-value"],
)
def test_a_broken_config_json_is_one_clear_line(content: str, expected: str, tiny_model_dir: Path, tmp_path: Path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text(content)
    with pytest.raises(UserError) as error:
        check_model_source(str(folder))
    assert str(error.value).startswith(f"{folder / 'config.json'} {expected}")
    assert "\n" not in str(error.value)


def test_a_tokenizer_larger_than_the_model_embeddings_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialogsum.modeling import check_tokenizer_fits

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    vocab = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir)).config.vocab_size
    check_tokenizer_fits(tokenizer, str(tiny_model_dir))  # its own tokenizer fits
    tokenizer.add_tokens([f"newword{i}" for i in range(vocab - len(tokenizer) + 1)])
    with pytest.raises(UserError) as error:
        check_tokenizer_fits(tokenizer, str(tiny_model_dir))
    assert str(error.value) == (
        f"the tokenizer has {vocab + 1:,} tokens but the model {tiny_model_dir} has embeddings for {vocab:,}: "
        "use the tokenizer the model was trained with (--tokenizer_name)"
    )


def test_an_adapter_records_a_base_that_resolves_from_anywhere(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path / "models")
    model = apply_lora(load_model("base"), LoraArguments(lora_r=4, lora_alpha=8))  # relative, as typed
    save_model(Accelerator(cpu=True), model, AutoTokenizer.from_pretrained("base"), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded base still loads
    from peft import AutoPeftModelForSeq2SeqLM

    assert AutoPeftModelForSeq2SeqLM.from_pretrained(str(tmp_path / "adapter")) is not None


def test_an_adapter_file_missing_tensors_is_refused_naming_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = apply_lora(load_model(str(tiny_model_dir)), LoraArguments(lora_r=4, lora_alpha=8))
    save_model(Accelerator(cpu=True), model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), tmp_path / "a")
    load_for_inference(str(tiny_model_dir), str(tmp_path / "a"))  # as saved: loads
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    gone = sorted(n for n in tensors if ".block.1." in n and "lora_B" in n)
    save_file({k: v for k, v in tensors.items() if k not in gone}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(UserError) as error:
        load_for_inference(str(tiny_model_dir), str(tmp_path / "a"))
    assert str(error.value).startswith(
        f"the adapter {tmp_path / 'a'} does not match its adapter_config.json: tensors {len(gone)} missing ({gone[0]}, "
    )
