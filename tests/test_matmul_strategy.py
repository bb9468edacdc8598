"""The GPU training-matmul strategy switch (subkern/ops/matmul_strategy.py): defaults, the
environment variable, the context manager, and clear errors for bad values."""

from __future__ import annotations

import pytest
import torch

from subkern.ops.matmul_strategy import (
    STRATEGIES,
    matmul_strategy,
    requested_strategy,
    use_matmul_strategy,
)


def test_auto_materializes_on_cuda_and_fuses_elsewhere(monkeypatch):
    monkeypatch.delenv("SUBKERN_GPU_MATMUL", raising=False)
    assert requested_strategy() == "auto"
    assert matmul_strategy(torch.device("cuda")) == "materialize"
    assert matmul_strategy(torch.device("cpu")) == "fused"
    assert matmul_strategy("cuda:1") == "materialize"


@pytest.mark.parametrize("value", ["fused", "materialize", " Materialize "])
def test_environment_forces_a_strategy(monkeypatch, value):
    monkeypatch.setenv("SUBKERN_GPU_MATMUL", value)
    want = value.strip().lower()
    assert matmul_strategy(torch.device("cuda")) == want
    assert matmul_strategy(torch.device("cpu")) == want


def test_context_manager_nests_and_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("SUBKERN_GPU_MATMUL", "fused")
    with use_matmul_strategy("materialize") as name:
        assert name == "materialize"
        assert matmul_strategy(torch.device("cpu")) == "materialize"
        with use_matmul_strategy("auto"):
            assert matmul_strategy(torch.device("cpu")) == "fused"
            assert matmul_strategy(torch.device("cuda")) == "materialize"
        assert matmul_strategy(torch.device("cpu")) == "materialize"
    assert matmul_strategy(torch.device("cuda")) == "fused"


def test_bad_values_raise_naming_the_setting(monkeypatch):
    monkeypatch.setenv("SUBKERN_GPU_MATMUL", "tiled")
    with pytest.raises(ValueError, match="SUBKERN_GPU_MATMUL must be one of auto, fused, "
                                         "materialize; got 'tiled'"):
        matmul_strategy(torch.device("cuda"))
    with pytest.raises(ValueError, match="strategy must be one of"):
        use_matmul_strategy("fast")
    assert STRATEGIES == ("auto", "fused", "materialize")
