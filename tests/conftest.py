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


@pytest.fixture
def ckpt(tmp_path, corpus):
    """A random 3-head byte-level model whose training corpus is a small directory of code:
    (checkpoint path, the model in eval mode)."""
    from mtp.checkpoint import save_checkpoint
    from mtp.config import ModelConfig
    from mtp.model import MTPTransformer
    from mtp.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=320, dim=32, n_layers=4, n_heads=4, max_seq_len=96,
                                       multiple_of=16, n_future=3))
    path = tmp_path / "run" / "checkpoint"
    save_checkpoint(path, model, ByteTokenizer(), train_config={"corpus": [str(corpus)], "val_fraction": 0.2})
    return path, model.eval()
