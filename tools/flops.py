"""Model FLOPs of T5 training and model FLOPs utilisation (MFU): the one formula of the benchmark and GPU check.

Only matmul FLOPs of real (non-padding) tokens count, per example with S prompt and T summary tokens:

    forward = 2 x [L_enc x (S x (4 d h + n_ff d d_ff) + 2 S^2 h)
                   + L_dec x (T x (6 d h + n_ff d d_ff) + 2 S d h + 2 T^2 h + 2 T S h) + T d V]

(d = d_model, h = heads x d_kv, n_ff = 3 for FLAN-T5's gated FFN, else 2, V = vocabulary; 2 FLOPs per
multiply-add). Training is 3 x forward for full fine-tuning and 2 x forward for LoRA, whose frozen weights get no
weight gradients (the adapters' own FLOPs are negligible and left out). Recomputation under gradient
checkpointing is not counted: it is work the method adds, not useful work. MFU = those FLOPs per second / the
device's peak rate at the same precision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FLOP_FORMULA = (
    "model FLOPs of the measured steps, real tokens only (padding excluded), T5 encoder/decoder-aware: per "
    "example with S prompt and T summary tokens, forward = 2 x [L_enc x (S x (4 d h_inner + n_ff d d_ff) + "
    "2 S^2 h_inner) + L_dec x (T x (6 d h_inner + n_ff d d_ff) + 2 S d h_inner + 2 T^2 h_inner + 2 T S h_inner) "
    "+ T d V] (n_ff = 3 for gated FFN); training = 3 x forward for full fine-tuning, 2 x forward for LoRA "
    "(frozen weights get no weight gradients; adapter FLOPs ignored); recomputation under gradient "
    "checkpointing is not counted. MFU = training FLOPs / measured seconds / peak FLOP/s at the same precision."
)


@dataclass(frozen=True)
class T5Dims:
    """The sizes of a T5-style encoder-decoder that decide its matmul FLOPs."""

    d_model: int
    inner: int
    d_ff: int
    ffn_matrices: int
    encoder_layers: int
    decoder_layers: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> T5Dims:
        """Read the sizes from a transformers T5 config (or a dict of it)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        gated = str(get("feed_forward_proj", "relu")).startswith("gated") or bool(get("is_gated_act", False))
        layers = int(get("num_layers"))
        return cls(
            d_model=int(get("d_model")),
            inner=int(get("num_heads")) * int(get("d_kv")),
            d_ff=int(get("d_ff")),
            ffn_matrices=3 if gated else 2,
            encoder_layers=layers,
            decoder_layers=int(get("num_decoder_layers") or layers),
            vocab=int(get("vocab_size")),
        )


def forward_flops(dims: T5Dims, source_len: int, target_len: int) -> float:
    """Matmul FLOPs of one forward pass over one example (S prompt tokens, T summary tokens)."""
    d, h, s, t = dims.d_model, dims.inner, source_len, target_len
    ffn = dims.ffn_matrices * d * dims.d_ff
    encoder = dims.encoder_layers * (s * (4 * d * h + ffn) + 2 * s * s * h)
    decoder = dims.decoder_layers * (
        t * (4 * d * h + 2 * d * h + ffn)  # self-attention q,k,v,o; cross-attention q,o; FFN
        + s * 2 * d * h  # cross-attention k,v over the encoder output
        + 2 * t * t * h  # self-attention scores and values
        + 2 * t * s * h  # cross-attention scores and values
    )
    head = t * d * dims.vocab
    return 2.0 * (encoder + decoder + head)  # 2 FLOPs per multiply-add


def training_flops(dims: T5Dims, lengths: Iterable[tuple[int, int]], method: str) -> float:
    """Useful training FLOPs for examples of (prompt, summary) lengths: 3x forward (full) or 2x (LoRA)."""
    factor = 3.0 if method == "full" else 2.0
    return factor * sum(forward_flops(dims, s, t) for s, t in lengths)


def training_flops_per_token(dims: T5Dims, lengths: list[tuple[int, int]], method: str) -> float:
    """Mean training FLOPs per real token over examples of these lengths (turns tokens/s into FLOP/s)."""
    tokens = sum(s + t for s, t in lengths)
    return training_flops(dims, lengths, method) / tokens if tokens else 0.0


def mfu(flops_per_s: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: achieved over peak FLOP/s (None when the peak is unknown)."""
    return flops_per_s / peak_flops_per_s if peak_flops_per_s else None
