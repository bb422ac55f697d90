"""Data-aware decomposition: fit compressed layers to the dense layers' outputs on calibration data.

``data`` turns ``calib_data`` into input batches, ``stats`` streams a layer's input Gram
matrices, ``fit`` holds the closed forms and refinements on those statistics, ``reconstruct``
the dense weight a factorised layer stands for, and ``sequential`` the layer-by-layer driver.
"""

from __future__ import annotations

from ttcompress.calibration.data import calib_batches, sample_calibration_set
from ttcompress.calibration.fit import (
    FitResult,
    corrected_bias,
    fit_layer,
    output_error,
    refine_by_gradient,
    refine_tt_cores,
    whitened_lowrank,
)
from ttcompress.calibration.reconstruct import dense_weight
from ttcompress.calibration.sequential import LayerCalibration, calibrate_sequentially
from ttcompress.calibration.stats import LayerStats, StatsAccumulator, layer_stats

__all__ = [
    "FitResult",
    "LayerCalibration",
    "LayerStats",
    "StatsAccumulator",
    "calib_batches",
    "calibrate_sequentially",
    "corrected_bias",
    "dense_weight",
    "fit_layer",
    "layer_stats",
    "output_error",
    "refine_by_gradient",
    "refine_tt_cores",
    "sample_calibration_set",
    "whitened_lowrank",
]
