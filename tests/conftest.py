"""Shared helpers for the lstm_ext tests."""

from __future__ import annotations

import pytest
import torch

import lstm_ext

# float64 must agree with torch.nn.LSTM to rounding; float32 to its own precision.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def paired_lstms(
    dtype: torch.dtype = torch.float64, **kwargs
) -> tuple[torch.nn.LSTM, lstm_ext.LSTM]:
    """A torch.nn.LSTM and an lstm_ext.LSTM with the same configuration and the same weights."""
    theirs = torch.nn.LSTM(**kwargs, dtype=dtype)
    ours = lstm_ext.LSTM(**kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")
