"""ttcompress: compress trained PyTorch models with tensor decompositions.

``nn.Linear`` layers become TT-matrix layers (:class:`TTLinear`, by TT-SVD) and ``nn.Conv2d``
layers CP-decomposed convolutions (:class:`CPConv2d`, by CP-ALS). A :class:`Plan` says what to
compress and how; :func:`compress` applies it; :func:`save` / :func:`load` write and rebuild
self-describing checkpoints.

Importing this package touches no GPU, sets no tensorly backend and does not import the heavy
optional modules (matplotlib, mlxtend); training, data and report helpers load on first use.
"""

from __future__ import annotations

from typing import Any

from ttcompress._version import __version__
from ttcompress.decompose.cp import CPDecomposition, cp_als, cp_param_count
from ttcompress.decompose.modes import choose_modes
from ttcompress.decompose.tt import TTMatrix, tt_param_count, tt_svd
from ttcompress.formats import CompressionFormat, format_names, format_of, formats_for, get_format, register_format
from ttcompress.io import get_meta, load, save
from ttcompress.layers import LAYER_TYPES, CPConv2d, TTLinear
from ttcompress.models import build_arch
from ttcompress.plan import CPSettings, Plan, Rule, TTSettings
from ttcompress.planfile import load_plan, plan_from_options
from ttcompress.surgery import compress, compress_with_report

# Loaded on first access (they pull in the training loop, datasets and reports).
_LAZY = {
    "load_dataset": "ttcompress.data",
    "train": "ttcompress.training",
    "finetune": "ttcompress.training",
    "evaluate": "ttcompress.evaluation",
    "TrainConfig": "ttcompress.training",
    "FinetuneConfig": "ttcompress.training",
    "build_report": "ttcompress.report",
    "run_sweep": "ttcompress.sweep",
    "run_demo": "ttcompress.demo",
}

__all__ = [
    "LAYER_TYPES",
    "CompressionFormat",
    "CPConv2d",
    "CPDecomposition",
    "CPSettings",
    "Plan",
    "Rule",
    "TTLinear",
    "TTMatrix",
    "TTSettings",
    "__version__",
    "build_arch",
    "choose_modes",
    "compress",
    "compress_with_report",
    "cp_als",
    "cp_param_count",
    "format_names",
    "format_of",
    "formats_for",
    "get_format",
    "get_meta",
    "load",
    "load_plan",
    "plan_from_options",
    "register_format",
    "save",
    "tt_param_count",
    "tt_svd",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ttcompress' has no attribute {name!r}")
