"""ttcompress: compress trained PyTorch models with tensor decompositions.

``nn.Linear`` layers become TT-matrix layers (:class:`TTLinear`, by TT-SVD) and ``nn.Conv2d``
layers CP-decomposed convolutions (:class:`CPConv2d`, by CP-ALS). A :class:`Plan` says what to
compress and how; :func:`compress` applies it; :func:`save` / :func:`load` write and rebuild
self-describing checkpoints (:func:`load` also reads Hugging Face model directories, and
:func:`save_hf_dir` writes one, with the applied plan recorded).

Importing this package touches no GPU, sets no tensorly backend and imports neither torch nor
the heavy optional modules (matplotlib, mlxtend): every public name loads on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ttcompress._version import __version__

if TYPE_CHECKING:  # the names below, for type checkers; at run time they load on first access
    from ttcompress.decompose.cp import CPDecomposition, cp_als, cp_param_count
    from ttcompress.decompose.modes import choose_modes
    from ttcompress.decompose.tt import TTMatrix, tt_param_count, tt_svd
    from ttcompress.checkpoint.hf import load_hf_dir, save_hf_dir
    from ttcompress.checkpoint.io import get_meta, load, save
    from ttcompress.layers import LAYER_TYPES, CPConv2d, TTLinear
    from ttcompress.checkpoint.models import build_arch
    from ttcompress.compression.plan import CPSettings, Plan, Rule, TTSettings
    from ttcompress.compression.planfile import load_plan, plan_from_options
    from ttcompress.compression.pipeline import CompressOptions, compress, compress_with_report, run_compress

# Every public name is loaded on first access, so that ``import ttcompress`` (and with it
# ``ttcompress --version`` / ``--help``) does not import torch.
_LAZY = {
    "CPDecomposition": "ttcompress.decompose.cp",
    "cp_als": "ttcompress.decompose.cp",
    "cp_param_count": "ttcompress.decompose.cp",
    "choose_modes": "ttcompress.decompose.modes",
    "TTMatrix": "ttcompress.decompose.tt",
    "tt_param_count": "ttcompress.decompose.tt",
    "tt_svd": "ttcompress.decompose.tt",
    "get_meta": "ttcompress.checkpoint.io",
    "load": "ttcompress.checkpoint.io",
    "save": "ttcompress.checkpoint.io",
    "load_hf_dir": "ttcompress.checkpoint.hf",
    "save_hf_dir": "ttcompress.checkpoint.hf",
    "LAYER_TYPES": "ttcompress.layers",
    "CPConv2d": "ttcompress.layers",
    "TTLinear": "ttcompress.layers",
    "build_arch": "ttcompress.checkpoint.models",
    "CPSettings": "ttcompress.compression.plan",
    "Plan": "ttcompress.compression.plan",
    "Rule": "ttcompress.compression.plan",
    "TTSettings": "ttcompress.compression.plan",
    "load_plan": "ttcompress.compression.planfile",
    "plan_from_options": "ttcompress.compression.planfile",
    "compress": "ttcompress.compression.pipeline",
    "CompressionFormat": "ttcompress.formats",
    "format_names": "ttcompress.formats",
    "format_of": "ttcompress.formats",
    "formats_for": "ttcompress.formats",
    "get_format": "ttcompress.formats",
    "register_format": "ttcompress.formats",
    "compress_with_report": "ttcompress.compression.pipeline",
    "CompressOptions": "ttcompress.compression.pipeline",
    "run_compress": "ttcompress.compression.pipeline",
    # these pull in the training loop, datasets and reports
    "load_dataset": "ttcompress.data",
    "train": "ttcompress.training",
    "finetune": "ttcompress.training",
    "evaluate": "ttcompress.report.evaluation",
    "TrainConfig": "ttcompress.training",
    "FinetuneConfig": "ttcompress.training",
    "build_report": "ttcompress.report.compare",
    "run_sweep": "ttcompress.sweep",
    "run_demo": "ttcompress.demo",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ttcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
