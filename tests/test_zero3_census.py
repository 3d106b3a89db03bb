"""tools/zero3_census.py: the census names what holds each large tensor (its real DeepSpeed output:
docs/benchmarks.md)."""

from __future__ import annotations

import torch

from dialogsum.memory import resident_bytes
from tools import zero3_census


class Bucket:
    def __init__(self) -> None:
        self.flat = torch.zeros(17 * 2**20)  # 68 MiB: over the census threshold


class Optimizer:
    def __init__(self) -> None:
        self.partitions = [torch.zeros(17 * 2**20)]
        self.state = {"p": {"exp_avg": torch.zeros(17 * 2**20)}}


def test_census_names_holders_by_attribute_list_and_state_key() -> None:
    bucket, optimizer = Bucket(), Optimizer()
    rows = {tuple(names) for size, shape, dtype, names in zero3_census.census() if size == 68 * 2**20}
    assert ("Bucket.flat",) in rows
    assert ("Optimizer.partitions[i]",) in rows
    assert ("dict['exp_avg']",) in rows
    assert resident_bytes() > 3 * 68 * 2**20  # the three zeroed tensors are resident (the census's memory figure)
    del bucket, optimizer


def test_a_model_without_zero3_has_nothing_gathered() -> None:
    model = torch.nn.Linear(3, 2)
    assert zero3_census.gathered_parameters(model) == (0, 8)  # no ZeRO-3 status: not gathered by ZeRO-3
