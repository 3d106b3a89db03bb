"""Drop-in replacements for layers of FLAN-T5 that compute the same function faster.

* **GELU.** FLAN-T5's ``dense_act_fn`` is ``gelu_new``: transformers' ``NewGELUActivation`` computes
  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) as eight separate tensor operations, each a full pass over
  the [batch, tokens, d_ff] activations, and keeps their intermediates for the backward pass.
  ``nn.GELU(approximate="tanh")`` is the same formula in one kernel (values agree to ~5e-7), so a step does
  fewer passes over memory and keeps fewer activations (docs/cpu-profile.md).

The layer holds no weights: state dicts, checkpoints and saved configs (still ``gelu_new``) are those of the
original model, and a reloaded model computes the same function.
"""

from __future__ import annotations

from torch import nn


def use_fast_layers(model: nn.Module) -> nn.Module:
    """Swap transformers' ``gelu_new`` modules for the fused tanh-GELU, in place.

    Idempotent; returns ``model``.
    """
    from transformers.activations import NewGELUActivation

    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model
