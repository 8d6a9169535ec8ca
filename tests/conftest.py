"""Shared pytest configuration."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests run on one thread: fastest there, and immune to CPU contention."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs the package registry (deselect with -m 'not network')")
    config.addinivalue_line("markers", "slow: slow test (deselect with -m 'not slow')")
