"""Where a DeepSpeed ZeRO-3 run's memory goes: scripts/train_full.py with a census of live tensors on rank 0.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3_offload.yaml --num_processes 2 \
        --mixed_precision no --dynamo_backend no tools/zero3_census.py --model_name_or_path <folder> \
        --train_file ../shared/data/dialogsum/dialogsum.dev.jsonl --max_train_steps 2 \
        --per_device_train_batch_size 2 --max_source_length 256 --max_target_length 64 --do_eval false \
        --report_to none --output_dir runs/census

Every flag is train_full.py's. Before and after each of the first two backward passes, rank 0 prints its resident
memory and how many parameters ZeRO-3 holds gathered; after the second backward pass, every tensor storage over
64 MiB with the attribute that holds it (found through the garbage collector's referrers). docs/benchmarks.md
(ZeRO-3 memory) has what it printed and how the estimate (dialogsum/memory.py) counts each buffer.
"""

from __future__ import annotations

import gc
import runpy
from pathlib import Path
from typing import Any

import torch

from dialogsum.memory import resident_bytes

CENSUS_MIN_BYTES = 64 * 2**20
GIB = 2**30


def gathered_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters ZeRO-3 holds gathered, all parameters): element counts."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel
        gathered += numel if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE else 0
    return gathered, total


def _attributes(owner: object, value: object) -> list[str]:
    """Names of ``owner``'s attributes that are ``value``."""
    attributes = getattr(owner, "__dict__", None)
    return [k for k, v in attributes.items() if v is value] if isinstance(attributes, dict) else []


def holders(tensor: torch.Tensor) -> list[str]:
    """What holds ``tensor``: ``Class.attribute`` (``[i]`` inside a list), ``dict['key']`` for a plain dict (an
    optimizer's state), or the holder's type (``IPGBucketZ3``)."""
    names = []
    for ref in gc.get_referrers(tensor):
        if isinstance(ref, list):
            for owner in gc.get_referrers(ref):
                if isinstance(owner, dict):  # an object's materialised __dict__
                    objects = [o for o in gc.get_referrers(owner) if getattr(o, "__dict__", None) is owner]
                    keys = [k for k, v in owner.items() if v is ref]
                    names += [f"{type(o).__name__}.{k}[i]" for o in objects for k in keys]
                else:
                    names += [f"{type(owner).__name__}.{k}[i]" for k in _attributes(owner, ref)]
        elif isinstance(ref, dict):
            keys = [k for k, v in ref.items() if v is tensor]
            owners = [o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref]
            names += [f"{type(o).__name__}.{k}" for o in owners for k in keys] or [f"dict[{k!r}]" for k in keys]
        elif not isinstance(ref, torch.Tensor) and type(ref).__name__ not in ("frame", "cell"):
            names += [f"{type(ref).__name__}.{k}" for k in _attributes(ref, tensor)] or [type(ref).__name__]
    return names or ["(a local variable or a closure)"]


def census() -> list[tuple[int, tuple[int, ...], str, list[str]]]:
    """Every live tensor storage over :data:`CENSUS_MIN_BYTES`: (bytes, a view's shape, dtype, holders)."""
    seen: dict[int, tuple[int, tuple[int, ...], str, list[str]]] = {}
    for obj in gc.get_objects():
        if not torch.is_tensor(obj):
            continue
        storage = obj.untyped_storage()
        if storage.nbytes() > CENSUS_MIN_BYTES and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (storage.nbytes(), tuple(obj.shape), str(obj.dtype), holders(obj))
    return sorted(seen.values(), key=lambda row: -row[0])


def report(accelerator: Any, where: str) -> None:
    """Print rank 0's resident memory and gathered parameters at ``where``."""
    gathered, total = gathered_parameters(accelerator._models[0])
    resident = resident_bytes() / GIB
    print(f"{where}: resident {resident:.2f} GiB, gathered {gathered:,} of {total:,} parameters", flush=True)


def instrument() -> None:
    """Wrap ``Accelerator.backward`` to report around the first two backward passes (rank 0)."""
    import accelerate

    real_backward = accelerate.Accelerator.backward
    calls = [0]

    def backward(self: Any, loss: torch.Tensor, **kwargs: Any) -> Any:
        calls[0] += 1
        watched = self.process_index == 0 and calls[0] <= 2
        if watched:
            report(self, f"before backward {calls[0]}")
        result = real_backward(self, loss, **kwargs)
        if watched:
            report(self, f"after backward {calls[0]}")
        if watched and calls[0] == 2:
            for size, shape, dtype, names in census():
                print(f"  {size / GIB:7.3f} GiB  {dtype:<14} {shape}  {', '.join(names)}", flush=True)
        return result

    accelerate.Accelerator.backward = backward


if __name__ == "__main__":
    from dialogsum.cli import run_cli

    instrument()
    run_cli(runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "train_full.py"))["main"])
