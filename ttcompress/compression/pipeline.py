"""The one compression pipeline: :func:`run_compress` (what ``decompose``, ``sweep``, ``demo`` and
:func:`compress` run).

One call does, in this order, everything a compression needs::

    options = CompressOptions(plan=Plan(target_ratio=8), calib_data=x, check_input="auto", source=path)
    result = run_compress(model, options)

1. check the model (finite weights), the device and the calibration inputs (they must run
   through the model), and run the dense model once on the forward-check input;
2. put the structure the formats need in place, take the plan's decisions in one pass (rank
   allocation under a target ratio, measured on the calibration inputs when there are some) and
   build every replacement (:func:`ttcompress.compression.surgery.prepare_and_build`);
3. swap the replacements worth it in (:func:`ttcompress.compression.surgery.swap_in`);
4. forward-check the compressed model and put back to dense the layers that break it
   (:func:`ttcompress.compression.surgery_checks.finish_checked`);
5. record the metadata a checkpoint needs to rebuild the model and repeat the run: every layer's
   record, the layers kept dense, and in ``info`` the ``plan``, the ``calibration`` data used, the
   ``forward_check`` (``{"checked": bool, "output_error": float | None}``) and the source file
   (``source``, ``source_path``, ``source_sha256``: :func:`ttcompress.checkpoint.teacher.source_record`).

:func:`compress` / :func:`compress_with_report` are the in-place Python entry points (keyword options
as :class:`CompressOptions`); :func:`decompose_file` is the whole ``decompose`` command: load →
:func:`run_compress` → save atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.calibration.budget import check_calib_memory
from ttcompress.calibration.collector import StatsCollector
from ttcompress.calibration.data import named_calibration
from ttcompress.checkpoint.io import load_checkpoint, save
from ttcompress.checkpoint.meta import copy_meta, has_meta, update_meta
from ttcompress.checkpoint.teacher import source_record
from ttcompress.compression.plan import LayerDecision, Plan
from ttcompress.compression.scaleout import process_group
from ttcompress.compression.surgery import FilterFn, ProgressFn, as_plan, prepare_and_build, swap_in
from ttcompress.compression.surgery_checks import (
    calibration_batches,
    check_finite_parameters,
    default_check_input,
    finish_checked,
    reference_output,
)
from ttcompress.errors import UserInputError
from ttcompress.formats import DENSE
from ttcompress.fsutil import check_not_inputs, strip_model_suffix
from ttcompress.layer_report import KEPT_DENSE_INFO, LayerReport, count_params, kept_dense
from ttcompress.report.evaluation import resolve_device

__all__ = [
    "AUTO_CHECK",
    "CompressOptions",
    "CompressionResult",
    "DecomposeResult",
    "compress",
    "compress_with_report",
    "decompose_file",
    "default_output_path",
    "nothing_compressed",
    "run_compress",
]

#: ``check_input="auto"``: forward-check on an input the model is known to take
#: (:func:`ttcompress.compression.surgery_checks.default_check_input`), when one can be made.
AUTO_CHECK = "auto"


@dataclass(frozen=True, eq=False)
class CompressOptions:
    """How :func:`run_compress` compresses a model (every option of :func:`compress`).

    Attributes
    ----------
    plan : Plan or dict, optional
        What to compress and how (default ``Plan()``: TT max rank 8 for Linear and Embedding, CP
        at 4x for Conv2d).
    filter_fn : callable, optional
        ``filter_fn(module, qualified_name) -> bool``; layers for which it is False stay dense.
    progress : callable, optional
        ``progress(done, total, name)``, see :data:`~ttcompress.compression.surgery.ProgressFn`.
    calib_data : optional
        Calibration inputs: a tensor (first dimension the batch), an iterable of tensors or of
        ``(input, target)`` pairs (targets are ignored), a ``DataLoader`` or a map-style
        ``Dataset`` (:func:`ttcompress.calibration.data.calib_batches`). When given, every layer
        is fitted to the dense layer's outputs on these inputs, sequentially
        (:func:`ttcompress.compression.surgery.build_calibrated`), and under ``plan.target_ratio``
        ranks are allocated by the measured output error
        (:func:`ttcompress.compression.allocate.input_grams`). Any input shape the model accepts works
        (e.g. ``(batch, seq, features)``).
    calib_samples : int, optional
        Use at most this many samples of ``calib_data``.
    calib_memory : int or str, optional
        Memory budget of one layer's calibration statistics, in bytes or as a size such as
        ``"4G"`` (default: a quarter of the available memory, at most 2 GiB;
        :mod:`ttcompress.calibration.budget`). Wide layers are sketched to fit it, and a layer
        whose smallest sketch does not fit is fitted data-free; the layer's note says which.
    calib_info : mapping, optional
        How the calibration data were chosen (dataset, samples, seed): recorded in the model's
        metadata under ``info["calibration"]`` with ``"used"`` (``{"used": False}`` without
        calibration data), and used to name the dataset in a calibration data error.
    check_input : tensor, tuple of tensors, dict or ``"auto"``, optional
        An input of the model (positional arguments as a tuple, keyword arguments as a dict), or
        :data:`AUTO_CHECK` for one the model records or configures (nothing when none can be
        made). The dense model runs on it first (it must run), and the compressed one at the end,
        in eval mode without gradients: a layer in whose forward (or whose parent's forward) the
        compressed model fails is put back to dense, with the error as its reason, until the
        model runs. The result's ``output_error`` compares the two outputs.
    device : str or torch.device, optional
        Where the decompositions (CP-ALS, Tucker-2, TT-SVD, SVD) and their calibration fits run:
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` (CUDA when present). Only the
        layer in flight is moved there; each new layer is moved back to where the model lives.
        Default: each layer where it lives. A device that is not available is a
        :class:`~ttcompress.errors.UserInputError`.
    source : path, optional
        The file the model was loaded from: recorded in the metadata as ``source`` (its name),
        ``source_path`` and ``source_sha256`` (:func:`ttcompress.checkpoint.teacher.source_record`),
        which ``finetune`` uses to find the dense model as its default teacher.
    total_params : int, optional
        The parameters of the whole model that ``model`` is a part of (one transformer block
        compressed at a time, :mod:`ttcompress.compression.blockwise`): ``plan.min_saving`` is a
        share of this many. Default: ``model``'s own. When given, ``model`` is
        a part of the model the plan is for: the plan's patterns are not checked against ``model``
        (the caller checks them against the whole model's layers).
    decisions : mapping of str to LayerDecision, optional
        The decisions for ``model``'s layers, by name, taken for the whole model it is a part of
        (one rank allocation over a model compressed block by block): used instead of planning.
    """

    plan: Plan | Mapping[str, Any] | None = None
    filter_fn: FilterFn | None = None
    progress: ProgressFn | None = None
    calib_data: Any = None
    calib_samples: int | None = None
    calib_memory: int | str | None = None
    calib_info: Mapping[str, Any] | None = None
    check_input: Any = None
    device: str | torch.device | None = None
    source: str | os.PathLike[str] | None = None
    total_params: int | None = None
    decisions: Mapping[str, LayerDecision] | None = None

    def calibration_record(self) -> dict[str, Any]:
        """What the metadata records under ``info["calibration"]``."""
        return {"used": self.calib_data is not None, **dict(self.calib_info or {})}


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`run_compress` did: the model, per-layer records and whole-model totals."""

    model: nn.Module
    records: tuple[LayerReport, ...]
    params_before: int
    params_after: int
    plan: Plan
    #: Relative Frobenius difference of the compressed model's output from the dense one on
    #: ``check_input`` (None when there was no check input).
    output_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.params_before / self.params_after if self.params_after else float("inf")

    @property
    def compressed(self) -> tuple[LayerReport, ...]:
        return tuple(r for r in self.records if r.format != DENSE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "output_error": self.output_error,
            "layers": [r.to_dict() for r in self.records],
            "plan": self.plan.to_dict(),
        }


def target_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` resolved (``auto``: CUDA when present); None stays None (each layer where it lives).

    Under torchrun (``WORLD_SIZE > 1``) ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``: each process
    decomposes its share of the layers on its own GPU.
    """
    if device is None:
        return None
    resolved = resolve_device(device)
    if (resolved.type == "cuda" and resolved.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return resolved


def run_compress(model: nn.Module, options: CompressOptions) -> CompressionResult:
    """Compress ``model`` in place as ``options`` say and report every compressible layer.

    The steps are in the module docstring. ``model``'s Linear/Conv2d/Embedding children are replaced;
    if the root itself is a compressible layer, the result's ``model`` is the new root.

    Notes
    -----
    All replacements are built before any is swapped in, so a failing decomposition leaves the
    model unchanged (with calibration data they are fitted on a copy of the model). A layer
    whose decomposition would not be smaller than the dense layer, or that saves less than
    ``plan.min_saving`` of the model's parameters at an error above ``plan.max_error`` (by
    default only with calibration data, see :class:`~ttcompress.compression.plan.Plan`), stays dense
    (:func:`~ttcompress.compression.surgery.keep_dense_reason`).

    Before planning, structure the formats need is put in place, exactly
    (:func:`~ttcompress.formats.structure.prepare_model`): every ``nn.MultiheadAttention`` becomes a
    :class:`~ttcompress.layers.attention.FactorizedMultiheadAttention` whose projections ``q``,
    ``k``, ``v``, ``out`` are layers of their own, and GPT-2's ``Conv1D`` layers become
    ``nn.Linear``. Layers a parent reads directly (the ``out_proj`` of an attention module that
    cannot be converted) and layers whose weight is tied to another module's parameter stay dense
    with the reason. After the swap, attention modules none of whose projections changed are put
    back (unless their encoder layer's feed-forward part changed), and ``nn.TransformerEncoder``
    nested-tensor fast paths that read changed weights are turned off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(options, CompressOptions):
        raise TypeError(f"options must be CompressOptions, got {type(options).__name__}")
    plan = as_plan(options.plan)
    device = target_device(options.device)
    check_finite_parameters(model)  # before allocation, calibration and every decomposition
    memory = None if options.calib_memory is None else check_calib_memory(options.calib_memory)
    check_input = default_check_input(model) if _is_auto(options.check_input) else options.check_input
    before = count_params(model)
    total = before if options.total_params is None else int(options.total_params)
    with named_calibration(options.calib_info):
        batches = calibration_batches(model, options.calib_data, options.calib_samples)
        collector = None if batches is None else StatsCollector(batches, memory=memory)
        reference = None if check_input is None else reference_output(model, check_input)
        prep, decisions, built = prepare_and_build(model, plan, options.filter_fn, options.progress, collector,
                                                   device, total, part=options.total_params is not None,
                                                   decided=options.decisions)
    records, meta_layers, swapped = swap_in(prep, decisions, built, plan, total)
    root, records, error = finish_checked(prep, swapped, records, meta_layers, check_input=check_input,
                                          reference=reference)
    if root is not model and not has_meta(root):
        copy_meta(model, root)
    info = _run_info(plan, options, records, checked=reference is not None, output_error=error)
    update_meta(root, layers={**prep.layer_records(root), **meta_layers}, info=info)
    return CompressionResult(root, tuple(records), before, count_params(root), plan, error)


def _is_auto(check_input: Any) -> bool:
    return isinstance(check_input, str) and check_input == AUTO_CHECK


def _run_info(plan: Plan, options: CompressOptions, records: list[LayerReport], *, checked: bool,
              output_error: float | None) -> dict[str, Any]:
    """The metadata ``info`` of one run: the plan, the calibration, the forward check, the source, the layers
    kept dense."""
    error = output_error if output_error is not None and math.isfinite(output_error) else None
    info: dict[str, Any] = {"plan": plan.to_dict(), "calibration": options.calibration_record(),
                            "forward_check": {"checked": checked, "output_error": error}}
    if options.source is not None:
        src = Path(options.source)
        info.update({"source": src.name, **source_record(src)})
    dense = kept_dense(records)  # recorded only when some layer stayed dense
    if dense:
        info[KEPT_DENSE_INFO] = dense
    return info


def compress_with_report(model: nn.Module, plan: Plan | Mapping[str, Any] | None = None,
                         **options: Any) -> CompressionResult:
    """Compress ``model`` in place per ``plan`` and report every compressible layer.

    ``options`` are the keyword options of :class:`CompressOptions` (``filter_fn``, ``progress``,
    ``calib_data``, ``calib_samples``, ``calib_memory``, ``calib_info``, ``check_input``, ``device``,
    ``source``); see :func:`run_compress`.
    """
    return run_compress(model, CompressOptions(plan=plan, **options))


def compress(model: nn.Module, plan: Plan | Mapping[str, Any] | None = None, **options: Any) -> nn.Module:
    """Compress ``model`` in place per ``plan``; return it (see :func:`compress_with_report`).

    Examples
    --------
    >>> from ttcompress.compression.plan import Plan, TTSettings
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> model = compress(model, Plan(tt=TTSettings(ranks=2)))
    >>> sorted(model.ttcompress_meta["layers"])
    ['0']
    """
    return compress_with_report(model, plan, **options).model


# --------------------------------------------------------------------------------------------------
# File-level operation (what `ttcompress decompose` runs)
# --------------------------------------------------------------------------------------------------
def default_output_path(input_path: str | os.PathLike[str]) -> Path:
    """``dir/model.pt`` → ``dir/model.tt.pt`` (any extension is replaced by ``.tt.pt``)."""
    p = Path(input_path)
    return p.with_name(strip_model_suffix(p.name) + ".tt.pt")


def nothing_compressed(result: CompressionResult) -> str:
    """Why a compression left every layer dense, in one line (the first reasons, and what would help).

    Layers the plan did not select (``--layers``/``--exclude``) are left out of the reasons.
    """
    unselected = ("not matched by layers", "excluded by pattern")
    selected = [r for r in result.records if not (r.skipped or "").startswith(unselected)]
    if not selected:
        return "nothing to compress: the plan selects no layer of this model (see `ttcompress inspect`)"
    reasons = [f"{r.name}: {r.skipped or r.note or 'kept dense'}" for r in selected[:3]]
    more = f"; ... (+{len(selected) - 3} more)" if len(selected) > 3 else ""
    return (f"nothing was compressed, every selected layer stays dense ({'; '.join(reasons)}{more}): lower the "
            "ranks or the error bound, or set a target ratio; nothing written")


@dataclass(frozen=True)
class DecomposeResult:
    """:func:`decompose_file`'s result: the compression report plus where it came from and went."""

    result: CompressionResult
    input: Path
    input_kind: str
    output: Path
    calibration: Mapping[str, Any] = field(default_factory=lambda: {"used": False})  # as recorded in the file

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "input_kind": self.input_kind, "output": str(self.output),
                "calibration": dict(self.calibration), **self.result.to_dict()}


def decompose_file(
    input_path: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    **options: Any,
) -> DecomposeResult:
    """Load a model file, :func:`run_compress` it and save a ttcompress checkpoint atomically.

    Parameters
    ----------
    input_path : path
        Any input :func:`ttcompress.checkpoint.io.load` accepts.
    output : path, optional
        Default :func:`default_output_path` (``model.tt.pt`` next to ``model.pt``). Must differ
        from the input. Nothing is written if anything fails.
    arch, arch_kwargs, trust_pickle, trust_code
        As for :func:`ttcompress.checkpoint.io.load`.
    **options
        :class:`CompressOptions` (``plan``, ``progress``, ``calib_data``, ``calib_samples``,
        ``calib_info``, ``device``, ``calib_memory``, ...). By default the model is forward-checked
        (``check_input="auto"``) and ``input_path`` is recorded as its ``source``.

    Raises
    ------
    UserInputError
        Every selected layer stayed dense (nothing is written).
    """
    opts = CompressOptions(**{"check_input": AUTO_CHECK, "source": input_path, **options})
    plan = as_plan(opts.plan)
    target_device(opts.device)  # an unavailable device fails before anything is loaded
    src = Path(input_path)
    dest = Path(output) if output is not None else default_output_path(src)
    check_not_inputs([dest], [src])
    loaded = load_checkpoint(src, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code)
    with process_group() as rank:  # under torchrun: every rank decomposes a share, rank 0 writes
        result = run_compress(loaded.model, replace(opts, plan=plan))
        if not result.compressed:
            raise UserInputError(nothing_compressed(result))
        if rank == 0:
            save(result.model, dest)
    return DecomposeResult(result, src, loaded.kind, dest, opts.calibration_record())
