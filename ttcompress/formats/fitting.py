"""Data-aware builds: fit a freshly decomposed layer to the dense layer's outputs on calibration data.

A format's ``build(module, options, calib=stats)`` decomposes as usual and then calls
:func:`calibrated` (or, with a closed form, fits directly and calls :func:`record_fit`). The fit
travels in the build's :class:`~ttcompress.formats.base.BuildResult` (``fit``), so that surgery
can report the output error before and after fitting next to the weight error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.fit import FitResult, fit_layer
from ttcompress.calibration.reconstruct import dense_weight
from ttcompress.calibration.stats import LayerStats
from ttcompress.formats.base import BuildResult

__all__ = ["calibrated", "check_calib", "record_fit"]

#: Rows of the weight compared at a time by :func:`record_fit`.
_ERROR_ROWS = 1024


def check_calib(calib: Any) -> LayerStats | None:
    """``calib`` if it is None or :class:`LayerStats`; ``TypeError`` naming ``calib`` otherwise."""
    if calib is not None and not isinstance(calib, LayerStats):
        raise TypeError(f"calib must be LayerStats or None, got {type(calib).__name__}")
    return calib


def record_fit(layer: nn.Module, fit: FitResult, weight: torch.Tensor) -> BuildResult:
    """The build result of ``layer`` fitted as ``fit`` says, after refreshing its ``rel_error``: the
    relative Frobenius error of its weight against the dense ``weight``."""
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1)
        w_hat = dense_weight(layer).detach().reshape(w.shape)
        diff2 = norm2 = 0.0
        for rows in range(0, w.shape[0], _ERROR_ROWS):  # float64 by blocks of rows: no float64 copy of W
            block = w[rows:rows + _ERROR_ROWS].double()
            diff2 += float((block - w_hat[rows:rows + _ERROR_ROWS].double()).square().sum())
            norm2 += float(block.square().sum())
        layer.rel_error = math.sqrt(diff2 / norm2) if norm2 > 0 else 0.0
    return BuildResult.of(layer, fit=fit)


def calibrated(module: nn.Module, layer: nn.Module, calib: Any) -> BuildResult:
    """The build result of ``layer`` (decomposed from ``module``), fitted to ``module``'s outputs on ``calib``.

    ``calib`` is None (``layer`` is taken as is) or the layer's
    :class:`~ttcompress.calibration.stats.LayerStats`. The fit is
    :func:`~ttcompress.calibration.fit.fit_layer`: ALS on TT cores, a bounded number of L-BFGS
    steps for other factorizations, then bias correction; it never raises the output error.
    """
    if check_calib(calib) is None:
        return BuildResult.of(layer)
    return record_fit(layer, fit_layer(module, layer, calib), module.weight)
