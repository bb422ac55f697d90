"""Dense export of a model whose factorized layers nest (a factorized attention's q/k/v)."""

from __future__ import annotations

import torch
import torchvision

import ttcompress
from ttcompress.export import merge_to_dense
from ttcompress.checkpoint.io import get_meta
from ttcompress.compression.plan import Plan


def test_merge_to_dense_merges_nested_factorized_layers_with_their_parent() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=3).eval()
    ours = ttcompress.compress(vit, Plan(target_ratio=2.0)).eval()
    names = list(get_meta(ours)["layers"])
    assert any(a.startswith(b + ".") for a in names for b in names)  # the case under test: nesting
    merged, layers = merge_to_dense(ours)
    assert all(layer.merged for layer in layers)
    assert not any(type(m).__module__.startswith("ttcompress") for m in merged.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ours(x), rtol=1e-4, atol=1e-5)
