"""A sharded safetensors directory (``model.safetensors.index.json`` + shards) is read one shard at
a time: never every shard open (mapped) at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from ttcompress.checkpoint.io import load  # noqa: E402


class _Tracked:
    """``safe_open`` that counts the handles open at once, and which files are opened."""

    open_now = 0
    most = 0
    opened: list[str] = []

    def __init__(self, real, path: str, **kwargs) -> None:  # noqa: ANN001
        self._inner = real(path, **kwargs)
        _Tracked.opened.append(Path(path).name)

    def __enter__(self):  # noqa: ANN204
        _Tracked.open_now += 1
        _Tracked.most = max(_Tracked.most, _Tracked.open_now)
        return self._inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        _Tracked.open_now -= 1
        self._inner.__exit__(*exc)


def test_a_sharded_model_is_read_one_shard_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "lm", max_shard_size="40KB")
    index = json.loads((tmp_path / "lm" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, **kw: _Tracked(real, path, **kw))
    _Tracked.open_now = _Tracked.most = 0
    _Tracked.opened = []
    loaded = load(tmp_path / "lm")
    assert _Tracked.most == 1 and _Tracked.open_now == 0  # never two shards open at once, all closed after
    # each shard: its header once, its tensors once (the keys come shard by shard)
    assert sorted(_Tracked.opened) == sorted(shards * 2)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
