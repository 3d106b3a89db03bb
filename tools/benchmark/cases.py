"""The measured cases: what each one changes, its name, and the plan of cases for a device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Accelerate's mixed_precision values as the tables name them.
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16"}


@dataclass
class Case:
    """One measured training configuration."""

    name: str
    loop: str  # "ours" | "reference"
    method: str  # "full" | "lora"
    batching: str  # "grouped" | "random" | "budget"
    precision: str  # accelerate's value: "no" | "bf16"
    gradient_checkpointing: bool = False
    with_eval: bool = False
    force_precision: bool = False
    compiled: bool = False
    buckets: bool = False
    max_tokens: int | None = None
    launch_config: str | None = None  # a launcher config other than the default one (e.g. deepspeed_zero2.yaml)


def config_prefix(launch_config: str | None) -> str:
    """The name prefix of a case run under another launcher config: ``zero2-`` for ``deepspeed_zero2.yaml``."""
    return f"{Path(launch_config).stem.removeprefix('deepspeed_')}-" if launch_config else ""


def case_name(
    method: str,
    batching: str,
    precision: str,
    gc: bool,
    compiled: bool = False,
    buckets: bool | None = None,
    max_tokens: int | None = None,
    prefix: str = "",
) -> str:
    """E.g. ``full-grouped-bf16``, ``lora-grouped-bf16-gc``, ``full-grouped-bf16-compiled`` (with the length buckets
    that go with compiling), ``full-grouped-bf16-compiled-nobuckets``, ``full-budget16k-bf16-compiled``."""
    budget = f"{max_tokens // 1024}k" if max_tokens and max_tokens % 1024 == 0 else str(max_tokens or "")
    name = f"{prefix}{method}-{batching}{budget}-{PRECISION_NAMES[precision]}"
    if compiled:
        name += "-compiled" + ("-nobuckets" if buckets is False else "")
    elif buckets:
        name += "-buckets"
    return name + ("-gc" if gc else "")


def eager_twin(case: Case) -> str:
    """The name of the case that differs from ``case`` only by running eager, without length buckets."""
    prefix = config_prefix(case.launch_config)
    return case_name(
        case.method, case.batching, case.precision, case.gradient_checkpointing, False, False, case.max_tokens, prefix
    )


def _ours(
    method: str,
    batching: str,
    precision: str,
    compiled: bool,
    gc: bool = False,
    buckets: bool | None = None,
    max_tokens: int | None = None,
    launch_config: str | None = None,
    default_precision: str = "no",
    with_eval: bool = False,
) -> Case:
    """One of our cases; length buckets go with compiling unless ``buckets`` says otherwise (``auto``)."""
    return Case(
        case_name(method, batching, precision, gc, compiled, buckets, max_tokens, config_prefix(launch_config)),
        "ours",
        method,
        batching,
        precision,
        gc,
        with_eval=with_eval,
        force_precision=precision == "bf16" and precision != default_precision,
        compiled=compiled,
        buckets=compiled if buckets is None else buckets,
        max_tokens=max_tokens,
        launch_config=launch_config,
    )


def plan_cases(
    precision: str, full_grid: bool, compiled: bool = False, gpu: bool = False, token_budgets: tuple[int, ...] = ()
) -> list[Case]:
    """The reference, our default path (``precision``, ``compiled`` as the launcher config says; with the eval
    test), then one change at a time; ``full_grid`` adds more.

    On a CPU (``gpu`` False) the changes are precision, batching, LoRA and gradient checkpointing (``full_grid``:
    every method x batching x precision, and LoRA with checkpointing). On a GPU they are eager vs compiled in
    both precisions, length buckets on/off, LoRA, and token budgets; ``full_grid`` adds LoRA eager, random
    batches, ZeRO-2 and gradient checkpointing.
    """
    other = "no" if precision == "bf16" else "bf16"
    default = _ours("full", "grouped", precision, compiled, default_precision=precision, with_eval=True)
    cases = [Case("reference", "reference", "full", "random", "no"), default]

    def add(*args: Any, **kwargs: Any) -> None:
        case = _ours(*args, default_precision=precision, **kwargs)
        if case.name not in {c.name for c in cases}:
            cases.append(case)

    if gpu:
        add("full", "grouped", precision, not compiled)  # eager vs compiled, same precision
        add("full", "grouped", other, False)  # the other precision, eager (bf16 vs TF32 without compiling)
        add("full", "grouped", other, True)  # ... and compiled
        add("full", "grouped", precision, True, buckets=False)  # compiled without length buckets
        add("full", "grouped", precision, True, buckets=True)
        add("lora", "grouped", precision, compiled)
        for tokens in token_budgets:
            add("full", "budget", precision, compiled, max_tokens=tokens)
        if full_grid:
            add("lora", "grouped", precision, not compiled)
            add("full", "random", precision, compiled)
            add("full", "grouped", precision, compiled, launch_config="deepspeed_zero2.yaml")
            add("full", "grouped", precision, compiled, gc=True)
        return cases
    if full_grid:
        combos = [(m, b, p) for m in ("full", "lora") for b in ("grouped", "random") for p in (precision, other)]
        for method, batching, case_precision in combos:
            add(method, batching, case_precision, compiled)
        add("full", "grouped", precision, compiled, gc=True)
        add("lora", "grouped", precision, compiled, gc=True)
    else:
        add("full", "grouped", other, compiled)
        add("full", "random", precision, compiled)
        add("lora", "grouped", precision, compiled)
        add("full", "grouped", precision, compiled, gc=True)
    return cases
