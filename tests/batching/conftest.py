"""Fixtures of the batching tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():  # noqa: ANN201
    """Tiny matrices gain nothing from intra-op threads, and on a shared CPU their barriers cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
