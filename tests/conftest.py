"""Shared test set-up: tiny models on one CPU thread, and a private token cache per test."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Token shards go to the test's own directory, never to ~/.cache."""
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
