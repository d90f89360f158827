"""Fixtures of the mini package's tests (self-contained: the product's tests/conftest.py is not on this path)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small models: one thread is several times faster than two fighting over a busy CPU. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
