"""PEFT methods: the adapter a recipe puts on the model and what goes with it.

- the peft config of each method (:func:`lora_config`: LoRA with DoRA, rsLoRA, the initialisations, all-linear;
  :func:`ia3_config`: (IA)^3), built from the run's settings;
- :func:`check_adapter`: what only peft itself can tell (which initialisations the installed version offers),
  refused before any weight loads;
- :func:`loraplus_optimizer`: LoRA+ parameter groups through peft's ``create_loraplus_optimizer``;
- PiSSA/OLoRA: these initialisations rewrite the base weights (``W_res = W - scale * B0 @ A0``), so an adapter
  saved as trained would only fit ``W_res``. :func:`keep_initial_adapter` remembers ``A0, B0``; every adapter
  folder is then written converted (:func:`plain_lora_state`) to a plain LoRA adapter of rank ``2r`` against the
  original base: ``scale * (B @ A - B0 @ A0) = scale' * [B | -B0] @ [A ; A0]`` (peft's
  ``path_initial_model_for_weight_conversion`` arithmetic, done here on the gathered state dict so that it also
  works under DeepSpeed ZeRO-3). Checkpoints' training state keeps the trained ``A, B``: a resumed run rebuilds
  ``W_res`` by the same (deterministic) initialisation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dialogsum.config import LORA_INITS, Config, IA3Arguments, LoraArguments, mutates_base_weights
from dialogsum.errors import UserError

#: Attribute of a PeftModel holding the initial ``lora_A``/``lora_B`` values of a PiSSA/OLoRA adapter (CPU copies).
INITIAL_ADAPTER_ATTR = "dialogsum_initial_adapter"


def init_value(text: str) -> bool | str:
    """``--init_lora_weights`` as peft takes it: ``true``/``false`` as booleans, the other names as they are."""
    return {"true": True, "false": False}.get(text, text)


def lora_targets(args: LoraArguments) -> list[str] | str:
    """``--lora_target_modules`` for peft: ``all-linear`` is peft's own keyword (every linear layer but the head)."""
    return "all-linear" if list(args.lora_target_modules) == ["all-linear"] else list(args.lora_target_modules)


def lora_config(args: LoraArguments) -> Any:
    """The peft ``LoraConfig`` of the run's LoRA settings."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_targets(args),
        bias="none",
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        init_lora_weights=init_value(args.init_lora_weights),
    )


def ia3_config(args: IA3Arguments) -> Any:
    """The peft ``IA3Config`` of the run's IA3 settings."""
    from peft import IA3Config, TaskType

    return IA3Config(
        task_type=TaskType.SEQ_2_SEQ_LM,
        target_modules=list(args.ia3_target_modules),
        feedforward_modules=list(args.ia3_feedforward_modules),
    )


def offered_inits() -> list[str]:
    """The ``--init_lora_weights`` values of :data:`LORA_INITS` that the installed peft declares."""
    from peft import LoraConfig

    # the field's type names them: bool | Literal['gaussian', ..., 'pissa_niter_[number of iters]', ...]
    declared = set(re.findall(r"['\"]([a-z_]+)", str(LoraConfig.__dataclass_fields__["init_lora_weights"].type)))
    return [name for name in LORA_INITS if name in ("true", "false") or name.removesuffix("N") in declared]


def check_adapter(cfg: Config) -> None:
    """Checks that need peft (no weights): the installed peft offers the chosen initialisation."""
    if cfg.method != "lora":
        return
    init = cfg.lora.init_lora_weights
    name = "pissa_niter_N" if init.startswith("pissa_niter_") else init
    offered = offered_inits()
    if name not in offered:
        import peft

        raise UserError(
            f"--init_lora_weights {init} needs a newer peft than the installed {peft.__version__} "
            f"(it offers {', '.join(offered)})"
        )


def check_topology(cfg: Config, accelerator: Any) -> None:
    """Refuse, before weights load, an initialisation that needs whole weights under ZeRO-3 sharded loading.

    DoRA (weight norms), PiSSA and OLoRA (decompositions of the base weights) compute from the base weights when
    the adapter is created: with ``zero3_init_flag: true`` those are already sharded to empty tensors.
    """
    if cfg.method != "lora":
        return
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not plugin.zero3_init_flag:
        return
    lo = cfg.lora
    uses = "--use_dora" if lo.use_dora else None
    if mutates_base_weights(lo.init_lora_weights):
        uses = f"--init_lora_weights {lo.init_lora_weights}"
    if uses:
        raise UserError(
            f"{uses} computes from the whole base weights when the adapter is created, which DeepSpeed's sharded "
            "loading (zero3_init_flag: true) has already split up; set zero3_init_flag: false in the accelerate config"
        )


# --------------------------------------------------------------------------------------------- LoRA+


def loraplus_optimizer(
    model: torch.nn.Module, cfg: Config, optimizer_class: type, settings: dict[str, Any]
) -> torch.optim.Optimizer:
    """``optimizer_class(**settings)`` (the run's ``--optim``, :func:`dialogsum.training.build_optimizer`) with
    LoRA+ groups: peft's ``create_loraplus_optimizer`` puts every ``lora_B`` (and 1-d, e.g. DoRA magnitude) tensor
    at ``--learning_rate x --loraplus_lr_ratio``; weight decay as the run's. The schedule scales every group alike."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(
        model,
        optimizer_class,
        lr=cfg.learning_rate,
        loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
        loraplus_weight_decay=cfg.train.weight_decay,
        **settings,
    )
    # peft returns its four groups even when some are empty (no embedding adapted): DeepSpeed refuses empty groups
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    return optimizer


# --------------------------------------------------------------------------------------------- PiSSA / OLoRA


def keep_initial_adapter(model: Any, args: LoraArguments) -> None:
    """For an initialisation that rewrites the base weights, keep CPU copies of the initial ``lora_A``/``lora_B``
    on the PeftModel (:data:`INITIAL_ADAPTER_ATTR`): :func:`plain_lora_state` needs them at every save."""
    if not mutates_base_weights(args.init_lora_weights):
        return
    initial = {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }
    setattr(model, INITIAL_ADAPTER_ATTR, initial)


def _scaled_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps ``scale`` at rank ``2r``: ``alpha / r`` needs 2 alpha, ``alpha / sqrt(r)`` sqrt(2) alpha."""
    return alpha * math.sqrt(2) if use_rslora else alpha * 2


def _tensor_key(name: str) -> str:
    """A parameter name without the wrappers a prepared model may add (DDP's ``module.``, compile's ``_orig_mod.``)."""
    return re.sub(r"^(module\.)+", "", name.replace("_orig_mod.", ""))


@contextmanager
def plain_lora_state(
    model: Any, state_dict: dict[str, torch.Tensor] | None
) -> Iterator[dict[str, torch.Tensor] | None]:
    """While saving ``model`` (a PeftModel, unwrapped): a LoRA adapter as a plain LoRA of the original base model.

    The saved config says ``init_lora_weights: true`` whatever the run's initialisation (recorded in its
    ``config.yaml``): loading a trained adapter overwrites the initial values anyway, and peft versions that do
    not know an initialisation (``orthogonal`` on peft 0.13) refuse to load a config naming it. For PiSSA/OLoRA,
    ``state_dict`` has every ``lora_A``/``lora_B`` replaced by the rank-``2r`` plain LoRA of the same update
    against the original base (``A' = [A ; A0]``, ``B' = [B | -B0]``) and the config ``r`` and ``lora_alpha`` to
    match, until the block ends. Any other model: ``state_dict`` as it is."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not hasattr(config, "init_lora_weights"):  # not LoRA (a full model, IA3)
        yield state_dict
        return
    saved = (config.r, config.lora_alpha, config.init_lora_weights)
    initial = getattr(model, INITIAL_ADAPTER_ATTR, None)
    converted = state_dict
    if initial:
        values = state_dict if state_dict is not None else model.state_dict()
        wanted = {_tensor_key(k): k for k in initial}
        converted = {}
        for key, value in values.items():
            name = wanted.get(_tensor_key(key))
            if name is None:
                converted[key] = value
                continue
            start = initial[name].to(value.device, value.dtype)
            converted[key] = (
                torch.cat([value, start], dim=0) if ".lora_A." in name else torch.cat([value, -start], dim=1)
            )
        config.r, config.lora_alpha = 2 * config.r, _scaled_alpha(config.lora_alpha, config.use_rslora)
    config.init_lora_weights = True
    try:
        yield converted
    finally:
        config.r, config.lora_alpha, config.init_lora_weights = saved
