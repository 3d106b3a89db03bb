"""Fast layers: the fused tanh-GELU computes what transformers' gelu_new computes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from test_modeling import FLAN_T5_BASE
from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

from dialogsum.fast_layers import use_fast_layers
from dialogsum.modeling import load_model


def test_fused_gelu_computes_the_same_model_and_saves_the_same_checkpoint(tmp_path: Path) -> None:
    """gelu_new -> nn.GELU(tanh): same logits, loss and gradients; weights and saved config untouched."""
    from transformers.activations import NewGELUActivation

    config = T5Config(**{**FLAN_T5_BASE, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2})
    config.num_decoder_layers, config.num_heads, config.vocab_size = 2, 4, 100
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 0, 1
    torch.manual_seed(0)
    original = T5ForConditionalGeneration(config)
    original.save_pretrained(tmp_path / "original")
    fused = load_model(str(tmp_path / "original"))  # the library's loader fuses by default
    acts = [m for m in fused.modules() if isinstance(m, torch.nn.GELU)]
    assert len(acts) == 4 and all(a.approximate == "tanh" for a in acts)  # one per FFN of 2 + 2 layers
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, NewGELUActivation) for m in original.modules()) == 4

    batch = {
        "input_ids": torch.randint(2, 100, (3, 12)),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
        "labels": torch.randint(2, 100, (3, 5)),
    }
    original.train(False)
    fused.train(False)
    out_a, out_b = original(**batch), fused(**batch)
    out_a.loss.backward()
    out_b.loss.backward()
    assert torch.allclose(out_a.logits, out_b.logits, atol=1e-5)
    assert abs(out_a.loss.item() - out_b.loss.item()) < 1e-5
    grads_a = dict(original.named_parameters())
    for name, p in fused.named_parameters():
        assert torch.allclose(p.grad, grads_a[name].grad, atol=1e-5), name

    fused.save_pretrained(tmp_path / "fused")
    saved = load_file(str(tmp_path / "fused" / "model.safetensors"))
    assert set(saved) == set(load_file(str(tmp_path / "original" / "model.safetensors")))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fused")
    assert reloaded.config.dense_act_fn == "gelu_new"  # the checkpoint still says what the model computes
    assert not any(isinstance(m, torch.nn.GELU) for m in reloaded.modules())
    use_fast_layers(use_fast_layers(reloaded))  # idempotent
    assert sum(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in reloaded.modules()) == 4
    plain = load_model(str(tmp_path / "original"), fused_activations=False)
    assert sum(isinstance(m, NewGELUActivation) for m in plain.modules()) == 4
