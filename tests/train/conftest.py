"""Shared by the training tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on two shared cores stall each other; one thread is faster and as exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
