"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs the package registry (deselect with -m 'not network')")
    config.addinivalue_line("markers", "slow: slow test (deselect with -m 'not slow')")
