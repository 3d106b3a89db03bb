"""Model and tokenizer: load (hub id or local dir) for training or inference, LoRA wrapping, gradient
checkpointing, parameter report, save and reload."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dialogsum.config import Config, GenerationArguments, IA3Arguments, LoraArguments, ModelArguments
from dialogsum.errors import UserError
from dialogsum.fast_layers import use_fast_layers
from dialogsum.files import json_object_or_none, read_json_object, write_text
from dialogsum.hub import ensure_hub_reachable
from dialogsum.portability import checkpoint_has_own_lm_head

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _check_source(name_or_path: str, what: str) -> None:
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} path is a file, expected a directory: {name_or_path}")
        if not (path / "config.json").exists() and what == "model":
            raise UserError(f"{name_or_path} is not a model directory (no config.json)")
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{what} directory not found: {name_or_path}")
    ensure_hub_reachable(name_or_path, "model", hint="--model_name_or_path /path/to/local/model")


def check_model_source(name_or_path: str) -> None:
    """Early, cheap check that a model can be loaded: a local seq2seq model dir or a reachable hub id."""
    _check_source(name_or_path, "model")
    if Path(name_or_path).is_dir():
        config = read_model_config(name_or_path)
        if not config.get("is_encoder_decoder", False):
            arch = ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])
            raise UserError(f"{name_or_path} is not a seq2seq (encoder-decoder) model ({arch}); use a T5/FLAN-T5 model")
        check_weight_files(Path(name_or_path))


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local model folder as a dict, checked by transformers' own config class: a file
    that is not a JSON object, or holds a value transformers refuses, is one clear :class:`UserError`."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    config = read_json_object(path, "model config")
    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - ValueError, TypeError, KeyError and transformers' validation errors
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(f"{path} is not a valid model config: {detail}") from exc
    return config


def check_weight_files(folder: Path) -> None:
    """Refuse a ``.safetensors`` file cut short (an interrupted copy or download) before any weight is loaded.

    Reads only the header, which must describe exactly the bytes of the file.
    """
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
            raise UserError(
                f"{path} is cut short or corrupt ({str(exc).splitlines()[0][:200]}); copy or save it again"
            ) from exc


def load_tokenizer(name_or_path: str) -> Any:
    """Load a tokenizer from a hub id or a local directory."""
    from transformers import AutoTokenizer

    _check_source(name_or_path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {name_or_path}: {str(exc).splitlines()[0]}") from exc


def generation_kwargs(gen: GenerationArguments, pad_token_id: int | None = None) -> dict[str, Any]:
    """The explicit generation settings (no hidden defaults such as the 20-token cap)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "do_sample": False,
        "length_penalty": gen.length_penalty,
    }
    if gen.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    return kwargs


@contextmanager
def whole_model_loading(enabled: bool) -> Iterator[None]:
    """Load weights whole on each process even when DeepSpeed ZeRO-3 is configured (``enabled``).

    accelerate registers its DeepSpeed config with transformers whatever ``zero3_init_flag`` says, so
    ``from_pretrained`` always builds a ZeRO-3 model sharded (``zero.Init``). That path ties FLAN-T5's own
    ``lm_head`` to the embedding under transformers 5.x; loading whole and letting ``prepare`` shard avoids it.
    """
    if not enabled:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_model(name_or_path: str, fused_activations: bool = True) -> torch.nn.Module:
    """Load a pretrained seq2seq model (fp32 master weights; precision is the launcher's business).

    With ``fused_activations`` the tanh-approximated GELU of FLAN-T5 runs as one fused kernel (see
    :mod:`dialogsum.fast_layers`; same function, saved checkpoints unchanged).

    transformers 5.x sets ``tie_word_embeddings=True`` on every T5 config (it also governs the encoder/decoder
    embedding ties, so it cannot simply be turned off). The normal loading path keeps a checkpoint's own
    ``lm_head`` untied, but DeepSpeed ZeRO-3's sharded construction (``zero3_init_flag: true``) ties it to the
    embedding, silently replacing FLAN-T5's output layer: that is refused here with the fix.
    """
    from transformers import AutoModelForSeq2SeqLM

    check_model_source(name_or_path)
    try:
        # mismatched shapes are reported in the loading info (and refused below) instead of raised
        model, info = AutoModelForSeq2SeqLM.from_pretrained(
            name_or_path, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model weights from {name_or_path}: {str(exc).splitlines()[0]}") from exc
    check_loading_info(name_or_path, info)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight and checkpoint_has_own_lm_head(name_or_path):
        raise UserError(
            f"{name_or_path} has its own lm_head but it was loaded tied to the input embedding (DeepSpeed "
            "ZeRO-3 sharded loading does this with transformers 5.x); set zero3_init_flag: false in the "
            "accelerate config"
        )
    if fused_activations:
        use_fast_layers(model)
    return model


def check_loading_info(name_or_path: str, info: dict[str, Any]) -> None:
    """Refuse weights that do not match the model's config: tensors missing (they would stay at random values),
    unexpected, or of another shape, named from ``from_pretrained``'s loading info (transformers only logs them)."""

    def names(entries: Any) -> list[str]:  # transformers 5.x: (name, saved shape, model shape); 4.x: names
        return sorted(e[0] if isinstance(e, tuple) else e for e in entries or ())

    def shape(entry: Any) -> str:
        if isinstance(entry, tuple) and len(entry) == 3:
            return f"{entry[0]} {list(entry[1])} in the file vs {list(entry[2])} in the config"
        return str(entry)

    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        found = names(info.get(key))
        if found:
            problems.append(f"{len(found)} {what} ({_some(found)})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda e: e[0] if isinstance(e, tuple) else e)
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ({_some([shape(e) for e in mismatched])})")
    problems += [" ".join(str(m).split())[:200] for m in info.get("error_msgs") or ()]
    if problems:
        raise UserError(
            f"the weights of {name_or_path} do not match its config.json: tensors {'; '.join(problems)}; "
            "the folder is incomplete or mixes two models: copy or save it again"
        )


def _some(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


def check_tokenizer_fits(tokenizer: Any, model_name_or_path: str) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings (an id past the table would fail in the
    middle of a run, or index another token's row)."""
    from transformers import AutoConfig

    try:
        vocab_size = AutoConfig.from_pretrained(model_name_or_path).vocab_size
    except (OSError, ValueError):
        return  # the model's own loading reports it
    if vocab_size and len(tokenizer) > vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model {model_name_or_path} has embeddings for "
            f"{vocab_size:,}: use the tokenizer the model was trained with (--tokenizer_name)"
        )


def load_for_training(
    args: ModelArguments, accelerator: Any, gen: GenerationArguments | None = None
) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and model to train (fp32 weights, gradient checkpointing if asked); LoRA is applied on top.

    Under DeepSpeed ZeRO-3 without ``zero3_init_flag`` the weights are loaded whole and ``prepare`` shards them.
    With ``gen``, the model's generation config takes the run's generation settings
    (:func:`use_generation_settings`), so that every folder saved from it generates like the run's evaluation.
    """
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path)
    check_tokenizer_fits(tokenizer, args.model_name_or_path)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    with whole_model_loading(plugin is not None and not plugin.zero3_init_flag):
        model = load_model(args.model_name_or_path)
    if gen is not None:
        use_generation_settings(model, gen)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return tokenizer, model


def use_generation_settings(model: torch.nn.Module, gen: GenerationArguments) -> None:
    """Put the run's ``max_new_tokens``, ``num_beams``, ``length_penalty`` and ``no_repeat_ngram_size`` (greedy or
    beam search, no sampling) into ``model.generation_config``.

    ``save_pretrained`` writes it as ``generation_config.json`` (adapters: :func:`save_model_files`), so a plain
    ``generate()`` on the reloaded folder does what evaluation did instead of stopping at transformers' 20-token
    default. The values are those of :func:`generation_kwargs`, the evaluation's own.
    """
    settings = generation_kwargs(gen)
    if gen.num_beams == 1:
        # only beam search reads it; transformers refuses to save a greedy config that sets it
        settings.pop("length_penalty")
    model.generation_config.update(**settings)
    # now the run's own settings: generate() must not swap them for ones derived from the model config
    model.generation_config._from_model_config = False


def model_from_config(config_dir: str, seed: int = 0) -> torch.nn.Module:
    """The architecture of ``config_dir`` with random weights and its own (untied) ``lm_head``.

    transformers 5.x ties ``lm_head`` to the embedding in ``from_config``; FLAN-T5 checkpoints have a separate
    head (247,577,856 parameters for flan-t5-base), so the head gets its own random values here.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    untie_lm_head(model)
    return model


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give ``lm_head`` its own parameter (random values) if it shares the input embedding's tensor."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(torch.randn_like(embed.weight) * embed.weight.std())
        model.config.tie_word_embeddings = False
        for attr in ("_tied_weights_keys", "all_tied_weights_keys"):  # keep the encoder/decoder embedding ties
            keys = getattr(model, attr, None)
            if isinstance(keys, dict):
                setattr(model, attr, {k: v for k, v in keys.items() if not k.startswith("lm_head")})


def _linear_layers(model: torch.nn.Module, flag: str, targets: list[str]) -> dict[str, list[tuple[str, Any]]]:
    """The linear layers each of ``targets`` names (``all-linear``: every one but the output head, as peft takes
    it); a name that matches none is refused (peft ignores it when another name matches)."""
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    found = {}
    for target in targets:
        if target == "all-linear":
            matched = [(n, m) for n, m in linear.items() if m is not head]
        else:
            matched = [(n, m) for n, m in linear.items() if n == target or n.endswith(f".{target}")]
        if not matched:
            leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise UserError(
                f"{flag} {target} matches no linear layer of the model (its layer names: {', '.join(leaf_names)})"
            )
        found[target] = matched
    return found


def check_lora_fits(model: torch.nn.Module, args: LoraArguments) -> None:
    """Refuse LoRA settings the model cannot take: a target name that matches no linear layer, or a rank above
    the smaller dimension of an adapted layer (a rank-r update of an m x n matrix needs r <= min(m, n))."""
    smallest: tuple[int, str, torch.nn.Linear] | None = None
    for matched in _linear_layers(model, "--lora_target_modules", list(args.lora_target_modules)).values():
        for name, module in matched:
            limit = min(module.in_features, module.out_features)
            if smallest is None or limit < smallest[0]:
                smallest = (limit, name, module)
    if smallest is not None and args.lora_r > smallest[0]:
        limit, name, module = smallest
        raise UserError(
            f"--lora_r {args.lora_r} is larger than the adapted layers allow: {name} maps {module.in_features} to "
            f"{module.out_features} features, so no update of it has a rank above {limit}; use --lora_r {limit} or less"
        )


def check_ia3_fits(model: torch.nn.Module, args: IA3Arguments) -> None:
    """Refuse an IA3 target name that matches no linear layer of the model."""
    _linear_layers(model, "--ia3_target_modules", list(args.ia3_target_modules))


def check_adapter_targets(model_name_or_path: str, cfg: Config) -> None:
    """:func:`check_lora_fits` / :func:`check_ia3_fits` before any weight is loaded: on the model's architecture
    built on the meta device from its config alone (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if cfg.method not in ("lora", "ia3"):
        return
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config of {model_name_or_path}: {str(exc).splitlines()[0]}") from exc
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    if cfg.method == "lora":
        check_lora_fits(model, cfg.lora)
    else:
        check_ia3_fits(model, cfg.ia3)


def check_lora_targets(model_name_or_path: str, args: LoraArguments) -> None:
    """:func:`check_lora_fits` on the meta-device architecture of ``model_name_or_path`` (no weights read)."""
    check_adapter_targets(model_name_or_path, Config(method="lora", lora=args))


def _wrap(model: torch.nn.Module, config: Any, flag: str, gradient_checkpointing: bool) -> torch.nn.Module:
    """``get_peft_model`` (only the adapter's weights stay trainable); a peft refusal is one error line."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # with frozen embeddings no input requires grad, and checkpointed blocks would get no gradient
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"{flag}: {str(exc).splitlines()[0]}") from exc


def apply_lora(model: torch.nn.Module, args: LoraArguments, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft; DoRA, rsLoRA, initialisation and targets from ``args``); only
    adapter weights stay trainable. PiSSA/OLoRA keep their initial values for saving
    (:func:`dialogsum.adapters.keep_initial_adapter`)."""
    from dialogsum.adapters import keep_initial_adapter, lora_config

    check_lora_fits(model, args)
    peft_model = _wrap(
        model, lora_config(args), f"--lora_target_modules {' '.join(args.lora_target_modules)}", gradient_checkpointing
    )
    keep_initial_adapter(peft_model, args)
    return peft_model


def apply_ia3(model: torch.nn.Module, args: IA3Arguments, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Wrap ``model`` with (IA)^3 scaling vectors (peft): one learned scale per output feature of each attention
    target, per input feature of each feed-forward target; only they stay trainable."""
    from dialogsum.adapters import ia3_config

    check_ia3_fits(model, args)
    return _wrap(
        model, ia3_config(args), f"--ia3_target_modules {' '.join(args.ia3_target_modules)}", gradient_checkpointing
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (less memory); caching is off while training."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions parameters to size 0


def parameter_report(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts (shared tensors counted once) and the trainable percentage."""
    total = trainable = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0,
    }


def describe_parameters(report: dict[str, Any]) -> str:
    """One line like the lab's: trainable / all / percent."""
    return (
        f"trainable model parameters: {report['trainable_params']:,} | all model parameters: "
        f"{report['total_params']:,} | trainable: {report['trainable_percent']:.2f}%"
    )


def save_model(accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: str | Path) -> float:
    """Save the final model: full weights (safetensors) or only the LoRA adapter, plus the tokenizer and the
    generation config (:func:`save_model_files`). Every process must call this. Returns the weights' size in MB.
    """
    save_model_files(accelerator, model, tokenizer, output_dir)
    return checkpoint_size_mb(output_dir)


def save_model_files(accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: str | Path) -> None:
    """Write a folder that loads on its own: full weights + config (``from_pretrained``) or the LoRA adapter
    (``PeftModel.from_pretrained``), the tokenizer and ``generation_config.json``. Used for the final model and
    for every checkpoint.

    Every process must call this: under DeepSpeed ZeRO-3 ``get_state_dict`` gathers the partitioned weights
    (consolidated, so the folder loads with a plain ``from_pretrained``). Under DeepSpeed with bf16 (or fp16) the
    trained weights are saved from DeepSpeed's fp32 master copy (:func:`deepspeed_master_weights`), not from the
    rounded copy the model computes with.
    """
    out = Path(output_dir)
    state_dict = accelerator.get_state_dict(model)
    masters = deepspeed_master_weights(accelerator, model)
    if state_dict is not None:
        state_dict.update({name: value for name, value in masters.items() if name in state_dict})
        # a model compiled by regions (the GPU launcher configs) names its tensors "<block>._orig_mod.<name>"
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.is_main_process:
        write_model_folder(unwrapped, tokenizer, out, state_dict=state_dict, save_function=accelerator.save)
    accelerator.wait_for_everyone()


def deepspeed_master_weights(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master values of the trained parameters when DeepSpeed trains in bf16 or fp16, by name (every
    name of a shared tensor); empty otherwise. Every process must call this (the values are gathered).

    DeepSpeed's bf16/fp16 mode keeps the model itself in 16 bits and the optimizer's fp32 copy as the true
    weights: ``get_state_dict`` (ZeRO-2: the module's ``state_dict``; ZeRO-3: the consolidated 16-bit weights)
    returns the 16-bit copy, in which updates below bf16's resolution are lost. These are the values DeepSpeed's
    ``zero_to_fp32`` recovers from a checkpoint. Frozen parameters (a LoRA base) have no master copy and keep
    the values they were loaded with.
    """
    from accelerate import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED or not hasattr(model, "bfloat16_enabled"):
        return {}
    if not (model.bfloat16_enabled() or model.fp16_enabled()):  # ``model`` is the DeepSpeed engine
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, param in model.module.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            names.setdefault(id(param), []).append(name)
            params[id(param)] = param
    masters = {}
    for key, param in params.items():  # the same order on every process: each gather is a collective
        value = safe_get_full_fp32_param(param)
        if value is not None:
            for name in names[key]:
                masters[name] = value.detach().to("cpu", torch.float32)
    return masters


def write_model_folder(
    model: torch.nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_function: Any = None,
) -> None:
    """The one writer of a model or adapter folder (final model, checkpoint, merged export): ``save_pretrained``
    of the model (``state_dict``, when given, holds its values) and the tokenizer, ``generation_config.json``,
    then the rewrites that make the folder load the same under every supported transformers and peft
    (:func:`dialogsum.portability.make_portable`)."""
    from dialogsum.adapters import plain_lora_state
    from dialogsum.portability import make_portable

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"save_function": save_function} if save_function is not None else {}
    with plain_lora_state(model, state_dict) as state_dict:  # PiSSA/OLoRA: against the original base weights
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True, **extra)
    tokenizer.save_pretrained(str(out))
    # peft does not write the generation config of an adapter; for a full model this replaces the same file
    write_text(out / "generation_config.json", model.generation_config.to_json_string())
    for change in make_portable(out):
        logger.debug("%s: %s", out, change)


#: Weight files of a model folder (single or sharded safetensors, or the older .bin).
_MODEL_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def weight_files(directory: str | Path) -> list[Path]:
    """The model's weight files in ``directory``: the adapter's in an adapter folder, else the model's (a
    checkpoint's optimizer and training-state files are not counted)."""
    folder = Path(directory)
    if (folder / "adapter_config.json").is_file():
        return sorted(p for p in folder.glob("adapter_model.*") if p.suffix in WEIGHT_SUFFIXES)
    return sorted(p for p in folder.iterdir() if p.is_file() and _MODEL_WEIGHTS.match(p.name))


def checkpoint_size_mb(directory: str | Path) -> float:
    """Size of the weight files (model or adapter, :func:`weight_files`) in a directory, in MB (10^6 bytes)."""
    return round(sum(p.stat().st_size for p in weight_files(directory)) / 1e6, 3)


def load_for_inference(model_name_or_path: str, adapter_path: str | None = None) -> torch.nn.Module:
    """Load a model for generation, optionally with a LoRA adapter on top (nothing trainable)."""
    model = load_model(model_name_or_path)
    if adapter_path:
        model = load_adapter(model, adapter_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_adapter(model: torch.nn.Module, adapter_path: str) -> torch.nn.Module:
    """Put a saved LoRA adapter on ``model`` for inference; refuse a folder that is not an adapter."""
    from peft import PeftModel

    folder = Path(adapter_path)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{adapter_path} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        adapted = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        base = (json_object_or_none(folder / "adapter_config.json") or {}).get("base_model_name_or_path")
        raise UserError(
            f"adapter {adapter_path} does not fit this model (trained on {base}): {str(exc).splitlines()[0][:200]}"
        ) from exc
    check_adapter_tensors(adapted, folder)
    return adapted


def check_adapter_tensors(model: torch.nn.Module, folder: Path) -> None:
    """Refuse an adapter file that misses tensors its config asks for (peft leaves those at their initial values,
    ``lora_B`` = 0: the adapter silently does less) or holds tensors the config does not place."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return  # an older .bin adapter: peft reads it; no header to compare cheaply
    with safe_open(str(weights), framework="pt") as fh:
        saved = set(fh.keys())
    expected = set(get_peft_model_state_dict(model))
    problems = []
    for found, what in ((sorted(expected - saved), "missing"), (sorted(saved - expected), "unexpected")):
        if found:
            problems.append(f"{len(found)} {what} ({_some(found)})")
    if problems:
        raise UserError(
            f"the adapter {folder} does not match its adapter_config.json: tensors {'; '.join(problems)}; "
            "the folder is incomplete or mixes two adapters: copy or save it again"
        )
