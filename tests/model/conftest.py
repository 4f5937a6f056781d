"""Fixtures shared by the model tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads; on a shared 2-core CPU the threads' barriers
    made the TiTok training test 30x slower (218 s against 8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
