"""Compatibility module: the training API now lives in :mod:`ttcompress.training` (the loop and its
parts) and :mod:`ttcompress.evaluation` (evaluate, devices). Existing imports keep working.

The rich progress UI moved to the command line side: :mod:`ttcompress.cli.progress`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import ttcompress.training as _training
from ttcompress.evaluation import EvalResult, evaluate, resolve_device, resolve_device_type
from ttcompress.training import (
    AMP_MODES,
    OPTIMIZERS,
    RESUME_FREE_OPTIONS,
    SCHEDULES,
    EpochRecord,
    FinetuneConfig,
    RunPaths,
    TrainCallback,
    TrainConfig,
    TrainResult,
    finetune,
    finetune_file,
    fit,
    fit_arch_kwargs,
    holdout_split,
    run_paths,
    train,
    train_arch,
)

__all__ = [*_training.__all__, "EvalResult", "evaluate", "resolve_device", "resolve_device_type"]


class _CallableModule(types.ModuleType):
    """Importing this module makes ``ttcompress.train`` (the package attribute) this module, which
    would shadow the public function :func:`ttcompress.train`: calling the module calls it."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
