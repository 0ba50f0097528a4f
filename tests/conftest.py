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


@pytest.fixture
def corpus(tmp_path):
    """A small code corpus: 8 Python files."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(8):
        (d / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 30)
    return d
