"""Memory estimate of a FLAN-T5 training run, per GPU and per host, before anything is downloaded or launched.

Sizes come from the architecture alone: the FLAN-T5 presets below (or a local ``config.json``) give every parameter
tensor's shape, hence the exact parameter count, the LoRA parameters (as peft adds them) and Adafactor's factored
state. Four launch strategies, each an accelerate config of this project:

=================  ===================================  ====================================================
strategy           config                               what each GPU holds
=================  ===================================  ====================================================
ddp                single_gpu.yaml / multi_gpu.yaml     fp32 weights (autocast computes in bf16), fp32
                                                        gradients (+ DDP's bucket copy), optimizer state
zero2              deepspeed_zero2.yaml                 bf16 weights; gradients and optimizer state / N
zero3              deepspeed_zero3.yaml                 bf16 weights, gradients and optimizer state / N, plus
                                                        the gathered parameters and the reduce bucket
zero3_offload      deepspeed_zero3_offload.yaml         the gathered parameters and the reduce bucket; the
                                                        rest in host RAM
=================  ===================================  ====================================================

DeepSpeed's accounting per parameter (its own estimators, ``estimate_zero2/3_model_states_mem_needs``): 2 bytes of
bf16 weights, 2 + 4 bytes of bf16 and fp32 gradients, 4 + 8 bytes of fp32 master weights and Adam moments (18
bytes per trainable parameter besides the weights; 16 under ZeRO-3, which keeps no full-size bf16 gradients), 4
bytes per parameter of the largest layer gathered under ZeRO-3, and host memory scaled by its
``additional_buffer_factor`` of 1.5. The model-state figures here follow it exactly for full fine-tuning with AdamW
(tests/test_memory.py checks that), and extend it to frozen parameters (LoRA), to Adafactor and to fp32 (where
DeepSpeed still clones an fp32 master partition, except ZeRO-3 without offload). Beyond the estimators, measured
here: ZeRO-3 keeps the parameters it will reuse gathered during a step (up to ``stage3_max_live_parameters``) and
allocates a ``reduce_bucket_size`` gradient bucket (``ZeRO-3 buffers``); on a CPU the processes' own memory is host
memory.

Activations are counted tensor by tensor from what autograd keeps for the backward pass of a T5 block (eager
attention, gated-GELU feed-forward, dropout in training mode), at the given batch and padded lengths; gradient
checkpointing keeps each block's input and recomputes one block at a time. The logits add the log-softmax that the
cross-entropy keeps plus two transient copies in its backward pass. docs/benchmarks.md compares the estimate with
measured peaks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogsum.config import check_all_linear_alone
from dialogsum.errors import UserError
from dialogsum.files import describe_value, read_json_object

GIB = 2**30
STRATEGIES = ("ddp", "zero2", "zero3", "zero3_offload")
CONFIGS = {
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "zero3_offload": "deepspeed_zero3_offload.yaml",
}
#: DeepSpeed's estimators multiply host memory by this (pinned buffers, fragmentation).
HOST_BUFFER_FACTOR = 1.5
#: CUDA context, cuBLAS workspaces and allocator slack per GPU (an assumption, not measured here).
GPU_RUNTIME_BYTES = 1 * GIB
#: The share of a GPU's memory an estimate may fill and still "fit" (the allocator fragments the rest).
USABLE_SHARE = 0.95
#: DeepSpeed's default ``stage3_max_live_parameters`` (the configs keep it): after the first step, ZeRO-3's prefetcher
#: keeps every parameter it will use again within ``stage3_max_reuse_distance`` (also 1e9) gathered, up to this many.
STAGE3_MAX_LIVE_PARAMETERS = 10**9
#: DeepSpeed's default ``reduce_bucket_size`` (the configs keep it): ZeRO-3 allocates a gradient bucket of this many
#: elements in the compute precision per process, whatever the model's size (measured: 1.86 GiB in fp32).
REDUCE_BUCKET_ELEMENTS = 5 * 10**8
#: The names peft's ``all-linear`` selects in a T5 (every Linear but the output layer).
ALL_LINEAR = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")


@dataclass(frozen=True)
class T5Dims:
    """The sizes of a (FLAN-)T5 v1.1 architecture."""

    d_model: int
    d_ff: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    d_kv: int = 64
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    gated: bool = True
    """gated-gelu feed-forward (wi_0, wi_1, wo) rather than relu (wi, wo)."""
    tied: bool = False
    """lm_head shares the embedding (FLAN-T5 has its own)."""
    dropout_rate: float = 0.1

    @property
    def inner(self) -> int:
        """Attention width: heads x d_kv."""
        return self.num_heads * self.d_kv


#: FLAN-T5 sizes (the published config.json files), so that no download is needed.
PRESETS = {
    "flan-t5-small": T5Dims(d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "flan-t5-base": T5Dims(d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "flan-t5-large": T5Dims(d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "flan-t5-xl": T5Dims(d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    "flan-t5-xxl": T5Dims(d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
}


def resolve_dims(model: str) -> T5Dims:
    """A preset (``flan-t5-large``, ``google/flan-t5-xl``, ``large``) or a directory/``config.json`` of a T5."""
    name = model.rsplit("/", 1)[-1].lower()
    for key in (name, f"flan-t5-{name}"):
        if key in PRESETS and not Path(model).exists():
            return PRESETS[key]
    path = Path(model)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise UserError(
            f"--model {model}: not one of {', '.join(PRESETS)} and no config.json there (give a model folder)"
        )
    c = read_json_object(config, "config.json")
    if "t5" not in str(c.get("model_type", "")).lower():
        raise UserError(f"--model {model}: model_type {c.get('model_type')!r} is not a T5; the estimate covers T5s")

    def size(key: str, default: int | None = None) -> int:
        """A size field: a whole number in [1, 2**31) (absent or null: ``default``, if there is one)."""
        value = c.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            found = "nothing" if value is None else describe_value(value)
            raise UserError(f"{config}: {key} must be a whole number from 1 to 2**31 - 1, got {found}")
        return value

    layers = size("num_layers")
    dropout = c.get("dropout_rate", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{config}: dropout_rate must be a number in [0, 1), got {describe_value(dropout)}")
    return T5Dims(
        d_model=size("d_model"),
        d_ff=size("d_ff"),
        num_heads=size("num_heads"),
        num_layers=layers,
        num_decoder_layers=size("num_decoder_layers", layers),
        d_kv=size("d_kv", 64),
        vocab_size=size("vocab_size"),
        relative_attention_num_buckets=size("relative_attention_num_buckets", 32),
        gated=str(c.get("feed_forward_proj", "relu")).startswith("gated"),
        # FLAN-T5 checkpoints carry their own lm_head whatever the flag says (see dialogsum.modeling.load_model)
        tied=False,
        dropout_rate=float(dropout),
    )


# --------------------------------------------------------------------------------------------- parameters


def parameter_shapes(dims: T5Dims) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor of ``T5ForConditionalGeneration`` as (module name, shape); Linear weights are
    (out, in). The shared embedding is listed once."""
    d, f, i, h = dims.d_model, dims.d_ff, dims.inner, dims.num_heads
    attention = [("q", (i, d)), ("k", (i, d)), ("v", (i, d)), ("o", (d, i))]
    ff = [("wi_0", (f, d)), ("wi_1", (f, d)), ("wo", (d, f))] if dims.gated else [("wi", (f, d)), ("wo", (d, f))]
    shapes: list[tuple[str, tuple[int, ...]]] = [("shared", (dims.vocab_size, d))]
    for stack, layers, cross in (("encoder", dims.num_layers, False), ("decoder", dims.num_decoder_layers, True)):
        for n in range(layers):
            block = [*attention, ("layer_norm", (d,))]
            if cross:
                block += [*attention, ("layer_norm", (d,))]
            block += [*ff, ("layer_norm", (d,))]
            shapes += [(f"{stack}.{n}.{name}", shape) for name, shape in block]
            if n == 0:
                shapes.append((f"{stack}.0.relative_attention_bias", (dims.relative_attention_num_buckets, h)))
        shapes.append((f"{stack}.final_layer_norm", (d,)))
    if not dims.tied:
        shapes.append(("lm_head", (dims.vocab_size, d)))
    return shapes


def count_parameters(dims: T5Dims) -> int:
    """The model's parameters (flan-t5-base: 247,577,856)."""
    return sum(math.prod(shape) for _, shape in parameter_shapes(dims))


def largest_layer(dims: T5Dims) -> int:
    """Parameters of the largest single module (the embedding or lm_head): what ZeRO-3 gathers at once."""
    return max(math.prod(shape) for _, shape in parameter_shapes(dims))


def linear_parameters(dims: T5Dims) -> int:
    """Parameters of the Linear layers (attention, feed-forward, lm_head): what autocast casts to bf16."""
    return sum(
        math.prod(shape)
        for name, shape in parameter_shapes(dims)
        if len(shape) == 2 and name != "shared" and not name.endswith("relative_attention_bias")
    )


def check_lora_targets(targets: list[str] | tuple[str, ...]) -> None:
    """Refuse a ``--lora_target_modules`` name that is no T5 Linear (training would refuse it with the model's layer
    names; here it would silently count nothing)."""
    known = {*ALL_LINEAR, "wi", "all-linear"}
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise UserError(
            f"--lora_target_modules {' '.join(unknown)}: no such Linear in a T5; choose from "
            f"{', '.join(sorted(known - {'all-linear'}))} or all-linear"
        )
    check_all_linear_alone(targets)


def lora_parameters(dims: T5Dims, r: int, targets: list[str] | tuple[str, ...]) -> int:
    """LoRA's trainable parameters as peft adds them: ``r x (in + out)`` per targeted Linear (``all-linear``: every
    Linear but lm_head). flan-t5-base, r=32 on q and v: 3,538,944."""
    names = set(ALL_LINEAR if "all-linear" in targets else targets)
    return sum(r * (shape[0] + shape[1]) for name, shape in parameter_shapes(dims) if name.rsplit(".", 1)[-1] in names)


def adafactor_state_bytes(shapes: list[tuple[int, ...]]) -> int:
    """transformers' Adafactor state without momentum (beta1 None): a row and a column second moment per matrix,
    a full one per vector, and one RMS value per tensor, all fp32 (the step counter is a Python number)."""
    total = 0
    for shape in shapes:
        factored = len(shape) >= 2
        total += 4 * (shape[-2] + shape[-1] if factored else math.prod(shape)) + 4
    return total


# --------------------------------------------------------------------------------------------- activations


def activation_bytes(
    dims: T5Dims,
    batch: int,
    source_len: int,
    target_len: int,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
    device: str = "cuda",
) -> int:
    """Bytes autograd keeps for the backward pass of one micro-batch (peak of the step), padded lengths.

    ``precision`` bf16: autocast (matmul outputs 2 bytes, the residual stream, layer norms and softmax 4, and each
    Linear keeps its own bf16 copy of its input); fp32: everything 4 bytes. Dropout (training mode) keeps a
    1-byte mask on a GPU, its input and a noise tensor on a CPU.
    """
    s, t, d, f, i, a, v = source_len, target_len, dims.d_model, dims.d_ff, dims.inner, dims.num_heads, dims.vocab_size
    e = 2 if precision == "bf16" else 4
    ea = 4 if device == "cpu" else e  # attention matmul operands (CPU autocast runs those matmuls in fp32)
    dropout = dims.dropout_rate > 0

    def drop(width: int) -> int:  # what one dropout keeps, per element: a mask (GPU) or its noise (CPU)
        return 0 if not dropout else 1 if device == "cuda" else width

    def norm_into(linears: int) -> int:  # RMS norm (input, normalized, fp32) and the input the Linears keep
        return 8 + (2 * linears if e == 2 else 4)

    def probs(queries: int, keys: int) -> int:  # softmax output (fp32), its dropout, what the value matmul reads
        if dropout:
            return a * queries * keys * (4 + drop(4 if device == "cpu" else e) + ea)
        return a * queries * keys * (4 + (0 if ea == 4 else ea))

    def attention(queries: int, keys: int, linears: int) -> int:
        # norm + q/k/v inputs, output dropout; q and the output projection's input; k and v; probabilities
        return (
            queries * d * (norm_into(linears) + drop(e))
            + queries * i * (e + ea)
            + 2 * keys * i * ea
            + probs(queries, keys)
        )

    def feed_forward(tokens: int) -> int:  # gated: wi_0 out (GELU input), GELU out, wi_1 out, wo's input
        width = 4 * e if dims.gated else 2 * e
        return tokens * (d * (norm_into(2 if dims.gated else 1) + drop(e)) + f * (width + drop(e)))

    encoder_layer = attention(s, s, 3) + feed_forward(s)
    decoder_layer = attention(t, t, 3) + attention(t, s, 1) + feed_forward(t)
    if e == 2:  # bf16: the decoder keeps its k/v outputs besides the matmul copies; cross k/v cast the encoder output
        decoder_layer += 2 * (s + t) * i * e + 2 * s * d * e
    # embeddings' dropout, final norms and their dropout, the encoder output (fp32, read by every cross-attention),
    # lm_head's input, and the logits: log-softmax kept (fp32) + its gradient and the logits' gradient
    rest = (s + t) * d * (8 + 2 * drop(4)) + s * d * 4 + t * d * e + 3 * t * v * 4
    if gradient_checkpointing:
        kept = (dims.num_layers * s + dims.num_decoder_layers * t) * d * 4  # each block's input
        per_example = kept + max(encoder_layer, decoder_layer) + rest
    else:
        per_example = dims.num_layers * encoder_layer + dims.num_decoder_layers * decoder_layer + rest
    # position biases (+ mask), one per attention kind, shared by the layers of a stack
    per_example += 4 * a * (s * s + t * t + t * s)
    return batch * per_example


# --------------------------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes per GPU and per host of one strategy, by component."""

    strategy: str
    config: str
    gpu: dict[str, int]
    host: dict[str, int]
    gpu_bytes: int = 0
    host_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gpu_bytes = sum(self.gpu.values())
        self.host_bytes = sum(self.host.values())

    def fits(self, gpu_memory_gb: float) -> bool:
        """Whether the per-GPU estimate fits a GPU of ``gpu_memory_gb`` GiB (:data:`USABLE_SHARE` of it)."""
        return self.gpu_bytes <= gpu_memory_gb * GIB * USABLE_SHARE


@dataclass
class Setup:
    """What is trained, where, at which batch and lengths."""

    dims: T5Dims
    method: str = "full"
    optim: str = "adamw"
    num_gpus: int = 1
    num_nodes: int = 1
    batch: int = 8
    source_len: int = 512
    target_len: int = 128
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    lora_r: int = 32
    lora_targets: tuple[str, ...] = ("q", "v")
    device: str = "cuda"

    @property
    def total(self) -> int:
        """Every parameter, adapters included."""
        return count_parameters(self.dims) + (self.trainable if self.method == "lora" else 0)

    @property
    def trainable(self) -> int:
        """Parameters that get gradients and optimizer state."""
        if self.method == "lora":
            return lora_parameters(self.dims, self.lora_r, self.lora_targets)
        return count_parameters(self.dims)

    @property
    def per_host(self) -> int:
        """Processes (GPUs) on each host."""
        return math.ceil(self.num_gpus / self.num_nodes)


def model_state_bytes(setup: Setup, strategy: str) -> tuple[dict[str, int], dict[str, int]]:
    """(per GPU, per host) bytes of weights, gradients and optimizer state for ``strategy``.

    Host memory: each process loads the fp32 model before ``prepare`` shards it (the configs load without
    ``zero3_init``), and ZeRO-3 offload keeps the offloaded states there; the larger of the two, times DeepSpeed's
    buffer factor.
    """
    total, trainable, n, per_host = setup.total, setup.trainable, setup.num_gpus, setup.per_host
    adafactor = setup.optim == "adafactor"
    load = 4 * total * per_host
    if strategy == "ddp":
        trained_shapes = _trainable_shapes(setup)
        optimizer = adafactor_state_bytes(trained_shapes) if adafactor else 8 * trainable
        # autocast keeps the bf16 copy of every Linear weight it made until the backward pass has used it
        copies = 2 * linear_parameters(setup.dims) if setup.precision == "bf16" else 0
        gpu = {
            "weights": 4 * total + copies,
            "gradients": 4 * trainable * (2 if n > 1 else 1),  # DDP's buckets are a second copy
            "optimizer": optimizer,
        }
        return gpu, {"model load (fp32 per process)": int(load * HOST_BUFFER_FACTOR)}
    # DeepSpeed (bf16): bf16 weights; fp32 master weights in the optimizer; bf16 + fp32 gradients. Under ZeRO the
    # optimizer sees flat partitions, so Adafactor cannot factor them: one fp32 second moment per parameter.
    moments = 4 if adafactor else 8
    weight_bytes = 2 if setup.precision == "bf16" else 4
    # fp32 master weights: a copy of the 16-bit partition; in fp32 too, ZeRO-2 and the offloaded optimizer clone the
    # fp32 partition (DeepSpeed's stage_1_and_2 / stage3 _create_fp32_partitions); ZeRO-3 on the GPU shares it
    master = 4 if setup.precision == "bf16" or strategy != "zero3" else 0
    grad_bytes = 6 if setup.precision == "bf16" else 4
    if strategy == "zero2":
        gpu = {
            "weights": weight_bytes * total,
            "gradients": grad_bytes * trainable // n,
            "optimizer": (master + moments) * trainable // n,
        }
        return gpu, {"model load (fp32 per process)": int(load * HOST_BUFFER_FACTOR)}
    gathered = 4 * largest_layer(setup.dims)
    if setup.precision == "bf16":
        grad_bytes = 4  # ZeRO-3 reduces into fp32 partitions only (no full-size bf16 gradient buffer)
    if strategy == "zero3":
        gpu = {
            "weights": weight_bytes * total // n + gathered,
            "gradients": grad_bytes * trainable // n,
            "optimizer": (master + moments) * trainable // n,
        }
        return gpu, {"model load (fp32 per process)": int(load * HOST_BUFFER_FACTOR)}
    if strategy == "zero3_offload":
        if setup.precision == "fp32":  # the partition's gradient and the fp32 master's own (the CPU optimizer's input)
            grad_bytes = 8
        offloaded = (weight_bytes * total + (grad_bytes + master + moments) * trainable) / setup.num_nodes
        gpu = {"weights": gathered, "gradients": 0, "optimizer": 0}
        host = max(load, offloaded) * HOST_BUFFER_FACTOR
        label = "offloaded states" if offloaded >= load else "model load (fp32 per process)"
        return gpu, {label: int(host)}
    raise UserError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def _trainable_shapes(setup: Setup) -> list[tuple[int, ...]]:
    if setup.method != "lora":
        return [shape for _, shape in parameter_shapes(setup.dims)]
    names = set(ALL_LINEAR if "all-linear" in setup.lora_targets else setup.lora_targets)
    targeted = [shape for name, shape in parameter_shapes(setup.dims) if name.rsplit(".", 1)[-1] in names]
    return [s for out, inp in targeted for s in ((setup.lora_r, inp), (out, setup.lora_r))]


def config_for(strategy: str, num_gpus: int) -> str:
    """The accelerate config of ``strategy`` (``accelerate_configs/<name>``)."""
    if strategy == "ddp":
        return "single_gpu.yaml" if num_gpus == 1 else "multi_gpu.yaml"
    return CONFIGS[strategy]


def estimate(setup: Setup) -> list[Estimate]:
    """Every strategy's per-GPU and per-host memory for ``setup``."""
    activations = activation_bytes(
        setup.dims,
        setup.batch,
        setup.source_len,
        setup.target_len,
        setup.precision,
        setup.gradient_checkpointing,
        setup.device,
    )
    results = []
    for strategy in STRATEGIES:
        gpu, host = model_state_bytes(setup, strategy)
        gpu = {**gpu, "ZeRO-3 buffers": gathered_bytes(setup, strategy), "activations": activations}
        if setup.device == "cuda":
            gpu["CUDA runtime (assumed)"] = GPU_RUNTIME_BYTES
        else:  # a CPU run: each process's "device" memory is host memory, its loaded model included
            own = {"processes' own memory (CPU)": setup.per_host * sum(gpu.values())}
            host = {**host, **own} if strategy == "zero3_offload" else own
        results.append(Estimate(strategy, config_for(strategy, setup.num_gpus), gpu, host))
    return results


def gathered_bytes(setup: Setup, strategy: str) -> int:
    """ZeRO-3's working buffers, in the compute precision: the parameters it keeps gathered during a step (every
    one, up to :data:`STAGE3_MAX_LIVE_PARAMETERS`; measured: after the first step all 247,577,856 parameters of
    flan-t5-base were gathered at the end of the forward) and its gradient reduce bucket
    (:data:`REDUCE_BUCKET_ELEMENTS`). docs/benchmarks.md has the measurements. Other strategies: 0."""
    if strategy not in ("zero3", "zero3_offload"):
        return 0
    elements = min(setup.total, STAGE3_MAX_LIVE_PARAMETERS) + REDUCE_BUCKET_ELEMENTS
    return (2 if setup.precision == "bf16" else 4) * elements


def recommend(estimates: list[Estimate], gpu_memory_gb: float) -> Estimate | None:
    """The first strategy (fastest first: DDP, ZeRO-2, ZeRO-3, ZeRO-3 offload) whose estimate fits the GPU."""
    return next((e for e in estimates if e.fits(gpu_memory_gb)), None)


def gib(value: float) -> str:
    """``12.34 GiB``."""
    return f"{value / GIB:.2f} GiB"


def report(setup: Setup, estimates: list[Estimate], gpu_memory_gb: float | None) -> str:
    """The estimate as a text table, with the config that fits ``gpu_memory_gb`` (if given)."""
    d = setup.dims
    lines = [
        f"T5 d_model {d.d_model}, d_ff {d.d_ff}, {d.num_heads} heads, {d.num_layers}+{d.num_decoder_layers} layers: "
        f"{setup.total:,} parameters, {setup.trainable:,} trainable ({setup.method}, {setup.optim})",
        f"{setup.num_gpus} GPU(s) on {setup.num_nodes} host(s); per-device batch {setup.batch}, lengths "
        f"{setup.source_len}/{setup.target_len} (padded), {setup.precision}, gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}",
        "",
        f"{'strategy':<14} {'weights':>10} {'gradients':>10} {'optimizer':>10} {'Z3 buffers':>10} {'activations':>12} "
        f"{'per GPU':>10} {'per host':>10}  config",
    ]
    for e in estimates:
        g = e.gpu
        row = [g["weights"], g["gradients"], g["optimizer"], g["ZeRO-3 buffers"], g["activations"]]
        cells = " ".join(f"{x / GIB:>10.2f}" for x in row[:4]) + f" {row[4] / GIB:>12.2f}"
        fit = ""
        if gpu_memory_gb is not None:
            fit = "  fits" if e.fits(gpu_memory_gb) else "  too big"
        lines.append(
            f"{e.strategy:<14} {cells} {e.gpu_bytes / GIB:>10.2f} {e.host_bytes / GIB:>10.2f}  {e.config}{fit}"
        )
    runtime = "; per GPU includes 1 GiB assumed for the CUDA runtime" if setup.device == "cuda" else ""
    own = ""
    if setup.device == "cpu":
        own = "; a CPU run: per host is the processes' own memory, plus any offloaded states"
    lines.append(
        f"(GiB{runtime}; per host: peak at model load or of the offloaded states, x1.5 as DeepSpeed estimates{own})"
    )
    if gpu_memory_gb is not None:
        best = recommend(estimates, gpu_memory_gb)
        if best is None:
            lines.append(
                f"nothing fits {gpu_memory_gb:g} GB per GPU: lower --batch, add --gradient_checkpointing, use LoRA "
                "or more GPUs"
            )
        else:
            lines.append(
                f"fits {gpu_memory_gb:g} GB per GPU: accelerate launch --config_file accelerate_configs/{best.config}"
                f" --num_processes {setup.num_gpus} ({best.strategy}, {gib(best.gpu_bytes)} per GPU)"
            )
    return "\n".join(lines)


def as_json(setup: Setup, estimates: list[Estimate]) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (bytes)."""
    return {
        "parameters": setup.total,
        "trainable": setup.trainable,
        "strategies": {
            e.strategy: {
                "config": e.config,
                "gpu": e.gpu,
                "gpu_bytes": e.gpu_bytes,
                "host": e.host,
                "host_bytes": e.host_bytes,
            }
            for e in estimates
        },
    }


# --------------------------------------------------------------------------------------------- measuring


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``), bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int | None:
    """This machine's available memory (``MemAvailable`` of /proc/meminfo); None where there is no such file."""
    try:
        with open("/proc/meminfo") as fh:
            line = next((x for x in fh if x.startswith("MemAvailable:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def check_fits_this_machine(single: Estimate) -> None:
    """Refuse ``--measure`` when the one-process estimate is more than this machine has available (the run would
    be killed for memory, or swap for a long time), before building the model."""
    available = available_bytes()
    if available is not None and single.gpu_bytes > available:
        raise UserError(
            f"--measure needs about {gib(single.gpu_bytes)} and this machine has {gib(available)} available; "
            "lower --batch or --source_len, or measure a smaller model"
        )


def offload_warning(model: str, setup_values: dict[str, Any]) -> str | None:
    """Under ZeRO-3 offload, a warning when the offloaded model states, as DeepSpeed estimates them (its 1.5 buffer
    factor included; activations left out), exceed this host's available memory; None when they fit, when the
    model's sizes are unknown here (a hub id that is no FLAN-T5 preset) or the method is not full fine-tuning or
    LoRA. ``setup_values``: :class:`Setup` fields (method, precision, num_gpus, num_nodes, lora_r, lora_targets).
    Measured: the flan-t5-large run of docs/bigger-models.md (26.3 GiB by this figure, 22.9 available) was killed
    for memory in its first step."""
    if setup_values.get("method") not in ("full", "lora"):
        return None
    try:
        setup = Setup(dims=resolve_dims(model), **setup_values)
    except UserError:
        return None
    needed = model_state_bytes(setup, "zero3_offload")[1].get("offloaded states", 0)
    available = available_bytes()
    if available is None or needed <= available:
        return None
    return (
        f"ZeRO-3 offload keeps about {gib(needed)} of model states in this host's memory (DeepSpeed's estimate with "
        f"its 1.5 buffer factor; at least {gib(needed / HOST_BUFFER_FACTOR)}) and {gib(available)} is available: "
        "expect the run to be killed for memory in its first step, or to swap; scripts/estimate_memory.py gives "
        "the whole estimate"
    )


def measure(model_dir: str, setup: Setup, steps: int = 3) -> dict[str, int]:
    """Train ``steps`` optimizer steps on the CPU, fp32, of ``model_dir``'s architecture (random weights, own
    lm_head) with this project's model building, LoRA wrapping and optimizer, on random tokens of the setup's
    batch and lengths; return the peak resident memory above the process's before the model was built (sampled
    every millisecond), the model's share of it, and the optimizer state's bytes (its tensors summed)."""
    import threading

    import torch

    from dialogsum.config import build_config
    from dialogsum.fast_layers import use_fast_layers
    from dialogsum.modeling import apply_lora, enable_gradient_checkpointing, model_from_config
    from dialogsum.training import build_optimizer

    values = {"output_dir": "unused", "optim": setup.optim, "lora_r": setup.lora_r}
    values["lora_target_modules"] = list(setup.lora_targets)
    cfg = build_config(setup.method, values)
    baseline, peak, running = resident_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        model = use_fast_layers(model_from_config(model_dir))
        model_bytes = resident_bytes() - baseline
        if setup.method == "lora":
            model = apply_lora(model, cfg.lora, setup.gradient_checkpointing)
        if setup.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        optimizer = build_optimizer(model, cfg)
        generator = torch.Generator().manual_seed(0)
        vocab = setup.dims.vocab_size
        batch = {
            "input_ids": torch.randint(2, vocab, (setup.batch, setup.source_len), generator=generator),
            "labels": torch.randint(2, vocab, (setup.batch, setup.target_len), generator=generator),
        }
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    finally:
        running[0] = False
        sampler.join()
    return {"peak_bytes": peak[0] - baseline, "model_bytes": model_bytes, "optimizer_state_bytes": state}


def measured_report(measured: dict[str, int], single: Estimate) -> str:
    """The measured peak beside the one-process (``ddp``) estimate."""
    return (
        f"measured on this CPU: peak {gib(measured['peak_bytes'])} above the process before the model "
        f"(estimate {gib(single.gpu_bytes)}), model {gib(measured['model_bytes'])} "
        f"(estimate {gib(single.gpu['weights'])}), optimizer state {measured['optimizer_state_bytes']:,} bytes "
        f"(estimate {single.gpu['optimizer']:,})"
    )
