"""Rank sweeps: for each setting, decompose → evaluate → fine-tune → evaluate, with a cache.

A sweep is the cross product of a TT axis (``tt_ranks`` and ``tt_eps`` values, for ``nn.Linear``)
and a CP axis (``cp_ranks``, for ``nn.Conv2d``). When one axis is empty, layers of that type stay
dense in every setting (a CP-only sweep compresses only the convolutions, as in the CP paper).

Every setting works in its own directory under ``output_dir``, named after the setting and a
fingerprint of everything that determines its result (:func:`cache_key`: the baseline file's
content, the dataset and its root, the fine-tuning options that change results, the teacher's
weights when distilling, the base plan and the ttcompress version; not the device or logging)::

    output_dir/
      tt-r4_cp-r3-1a2b3c4d/
        decomposed.pt      the compressed model before fine-tuning, by the pipeline ``decompose`` runs
                           (:func:`~ttcompress.compression.pipeline.run_compress`: forward-checked; plan,
                           calibration and source recorded) (+ decomposed.json: its accuracy)
        model.pt           the best fine-tuned checkpoint (and finetune's own files beside it)
        result.json        written last: the setting's result

A setting whose ``result.json`` exists is not run again, and an interrupted fine-tuning continues
from its resume state, so re-running an interrupted sweep with the same arguments resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress._version import __version__
from ttcompress.calibration.budget import check_calib_memory
from ttcompress.calibration.data import DEFAULT_CALIB_SAMPLES, calib_batches, named_calibration
from ttcompress.data import DatasetBundle, balanced_subset, check_model_fits
from ttcompress.errors import DataError, InputError, UserInputError
from ttcompress.formats.checks import check_ratio
from ttcompress.compression.plan import Plan, plan_layers
from ttcompress.compression.planfile import (
    NONE,
    SHORTHANDS,
    is_size_param,
    load_plan,
    plan_from_options,
    plan_kwargs,
    split_param,
)
from ttcompress.report.evaluation import evaluate, perplexity, resolve_device
from ttcompress.checkpoint.io import load, save
from ttcompress.layer_report import count_params
from ttcompress.compression.pipeline import AUTO_CHECK, CompressOptions, run_compress
from ttcompress.compression.surgery_checks import check_finite_parameters
from ttcompress.checkpoint.teacher import load_teacher
from ttcompress.training.api import finetune
from ttcompress.training.checkpoint import RESUME_FREE_OPTIONS
from ttcompress.training.config import FinetuneConfig, TrainConfig
from ttcompress.training.records import TrainCallback, run_paths

__all__ = ["SweepResult", "SweepSetting", "calibration_subset", "run_sweep", "sweep_settings"]


#: A setting's plan options: field of :class:`SweepSetting` -> (parameter of
#: :func:`~ttcompress.compression.planfile.plan_from_options`, key prefix, label prefix).
_AXES: dict[str, tuple[str, str, str]] = {
    "tt_ranks": ("tt_ranks", "tt-r", "TT r"),
    "tt_eps": ("tt_eps", "tt-e", "TT ε"),
    "tt_d": ("tt_d", "tt-d", "TT d"),
    "cp_rank": ("cp_ranks", "cp-r", "CP r"),
    "cp_ratio": ("cp_ratio", "cp-x", "CP ×"),
    "target_ratio": ("target_ratio", "target-x", "target ×"),
}


def _frozen(value: Any) -> Any:
    """A setting value in a hashable form (lists as tuples)."""
    return tuple(value) if isinstance(value, list) else value


def _text(value: Any, sep: str) -> str:
    """A value in a setting's key or label: ``4``, ``0.1``, ``16x32`` (key) / ``16,32`` (label)."""
    if isinstance(value, (tuple, list)):
        return sep.join(_text(v, sep) for v in value)
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class SweepSetting:
    """One point of a sweep: the per-setting plan options, as ``ttcompress decompose`` takes them.

    ``None`` is "not given"; :data:`~ttcompress.compression.planfile.NONE` (``"none"``) on a rank option
    (``tt_ranks``, ``tt_eps``, ``cp_rank``, ``cp_ratio``) keeps that format's layers dense. Which
    layer types are compressed follows :func:`~ttcompress.compression.planfile.plan_from_options`'s one rule:
    once any per-format option is given, a type whose options are not given stays dense.
    """

    tt_ranks: int | str | None = None
    tt_eps: float | str | None = None
    tt_d: int | None = None
    cp_rank: int | str | None = None
    cp_ratio: float | str | None = None
    target_ratio: float | None = None
    #: Any other format setting of this point, ``(("svd.rank", 16), ...)`` (``FORMAT.FIELD`` -> a
    #: value, or ``"none"`` on a size setting: that format's layers dense).
    values: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple((str(k), _frozen(v)) for k, v in dict(self.values).items()))
        if self.tt_ranks is not None and self.tt_eps is not None:
            raise UserInputError("a sweep setting takes tt_ranks or tt_eps, not both")
        if self.cp_rank is not None and self.cp_ratio is not None:
            raise UserInputError("a sweep setting takes cp_rank or cp_ratio, not both")
        for name in _AXES:
            value = getattr(self, name)
            if isinstance(value, str) and (value != NONE or name in ("tt_d", "target_ratio")):
                raise UserInputError(f"{name} must be a number{' or none' if name not in ('tt_d', 'target_ratio') else ''}, "
                                     f"got {value!r}")
        if not any(getattr(self, n) not in (None, NONE) for n in ("tt_ranks", "tt_eps", "cp_rank", "cp_ratio",
                                                                   "target_ratio")) and not any(
                v not in (None, NONE) and is_size_param(k) for k, v in self.values):
            raise UserInputError("a sweep setting must compress something (tt_ranks, tt_eps, cp_rank, cp_ratio "
                                 "or target_ratio)")

    def _given(self) -> list[tuple[str, str, Any]]:
        """``(key prefix, label prefix, value)`` of every option this point gives."""
        named = [(_AXES[n][1], _AXES[n][2], getattr(self, n)) for n in _AXES if getattr(self, n) not in (None, NONE)]
        return named + [(k.replace(".", "-").replace("_", "-"), f"{k} ", v) for k, v in self.values
                        if v not in (None, NONE)]

    @property
    def key(self) -> str:
        """File-system-safe name, e.g. ``tt-r4_cp-r3``, ``target-x8`` or ``svd-rank16``."""
        return "_".join(f"{k}{_text(v, 'x')}" for k, _, v in self._given())

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``TT r4 + CP r3``, ``target ×8`` or ``svd.rank 16``."""
        return " + ".join(f"{label}{_text(v, ',')}" for _, label, v in self._given())

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~ttcompress.compression.planfile.plan_from_options` for this setting."""
        return plan_kwargs({**{_AXES[n][0]: getattr(self, n) for n in _AXES}, **dict(self.values)})

    def plan(
        self,
        base: Plan | None = None,
        *,
        formats: Sequence[str] = (),
        layers: Sequence[str] = (),
        exclude: Sequence[str] = (),
        min_saving: float | None = None,
        max_error: float | None = None,
    ) -> Plan:
        """The compression plan of this setting, on top of ``base`` and the sweep's shared options."""
        return plan_from_options(base=base, formats=formats, layers=layers, exclude=exclude, min_saving=min_saving,
                                 max_error=max_error, **self.options())


def sweep_settings(
    *,
    tt_ranks: Sequence[int | str | None] = (),
    tt_eps: Sequence[float | str | None] = (),
    tt_d: Sequence[int | str | None] = (),
    cp_ranks: Sequence[int | str | None] = (),
    cp_ratio: Sequence[float | str | None] = (),
    target_ratios: Sequence[float | str | None] = (),
    values: Mapping[str, Sequence[Any]] | None = None,
) -> list[SweepSetting]:
    """The cross product of the axes: TT (ranks, then eps values) × TT cores × CP (ranks, then
    ratios) × target ratios × one axis per other format setting in ``values``.

    ``values`` maps settings (``FORMAT.FIELD``, e.g. ``"svd.rank"``) to their axes; those the
    keywords name (``tt.ranks`` is ``tt_ranks``, ``cp.rank`` is ``cp_ranks``, ...) join their axes.
    ``None`` or ``"none"`` in a size axis (``tt_ranks``, ``tt_eps``, ``cp_ranks``, ``cp_ratio``,
    ``svd.rank``, ...) is a point where that layer type stays dense (``tt_ranks=[None, 8],
    cp_ranks=[3]`` gives "CP r3" and "TT r8 + CP r3"); in another axis (``tt_d``,
    ``target_ratios``) it is a point without that option. A combination that would compress
    nothing is left out.
    """
    axes = {"tt_ranks": list(tt_ranks), "tt_eps": list(tt_eps), "tt_d": list(tt_d), "cp_ranks": list(cp_ranks),
            "cp_ratio": list(cp_ratio)}
    shorthand = {param: key for key, param in SHORTHANDS.items()}
    others: dict[str, list[Any]] = {}
    for param, items in dict(values or {}).items():
        fmt_name, field = split_param(param)
        param = f"{fmt_name}.{field}"
        if param in shorthand:
            axes[shorthand[param]] += list(items)
        else:
            others[param] = list(items)
    tt_ranks, tt_eps, tt_d, cp_ranks, cp_ratio = (axes[k] for k in ("tt_ranks", "tt_eps", "tt_d", "cp_ranks", "cp_ratio"))
    for name, items in (("tt_ranks", tt_ranks), ("cp_ranks", cp_ranks), ("tt_d", tt_d)):
        for v in items:
            if v is not None and v != NONE and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(name, f"must hold positive ints (or none), got {v!r}")
    for e in tt_eps:
        if e is not None and e != NONE and (isinstance(e, bool) or not (isinstance(e, (int, float)) and 0 < e < 1)):
            raise InputError("tt_eps", f"values must be in (0, 1), got {e!r}")
    for t in target_ratios:
        if t is not None and t != NONE:
            check_ratio(t, "target_ratios")

    def dense(v: Any) -> Any:
        return NONE if v is None else v

    def plain(v: Any) -> Any:
        return None if v == NONE else v

    tt_axis = [("tt_ranks", dense(v)) for v in tt_ranks] + [("tt_eps", dense(v)) for v in tt_eps] or [("tt_ranks", None)]
    cp_axis = [("cp_rank", dense(v)) for v in cp_ranks] + [("cp_ratio", dense(v)) for v in cp_ratio] or [("cp_rank", None)]
    d_axis = [plain(v) for v in tt_d] or [None]
    target_axis = [plain(v) for v in target_ratios] or [None]
    other_axes = [[(param, dense(v) if is_size_param(param) else plain(v)) for v in items] or [(param, None)]
                  for param, items in others.items()]
    if not (tt_ranks or tt_eps or cp_ranks or cp_ratio or target_ratios or any(others.values())):
        raise UserInputError("give at least one of tt_ranks, tt_eps, cp_ranks, cp_ratio, target_ratios or a format "
                             "setting")
    settings = []
    for (tk, tv), d, (ck, cv), target, *extra in itertools.product(tt_axis, d_axis, cp_axis, target_axis, *other_axes):
        point = {tk: tv, "tt_d": d, ck: cv, "target_ratio": target}
        sizes = [v for k, v in extra if is_size_param(k)]
        if all(v in (None, NONE) for k, v in point.items() if k != "tt_d") and all(v in (None, NONE) for v in sizes):
            continue
        setting = SweepSetting(**point, values=tuple((k, v) for k, v in extra if v is not None))
        setting.plan()  # checks the values (ranges, target ratio with fixed ranks, ...)
        settings.append(setting)
    if not settings:
        raise UserInputError("the sweep compresses nothing: every setting keeps every layer dense")
    if len({s.key for s in settings}) != len(settings):
        raise UserInputError("the sweep has duplicate settings; give each rank/eps once")
    return settings


@dataclass(frozen=True)
class SweepResult:
    """The outcome of one setting (what ``result.json`` holds)."""

    setting: SweepSetting
    model_path: Path
    accuracy_before: float
    accuracy_after: float
    params: int
    compression: float
    cached: bool = False
    #: What ``accuracy_before``/``accuracy_after`` hold: top-1 (a fraction), or for text data the
    #: validation perplexity (lower is better).
    metric: str = "top-1"

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": {k: v for k, v in dataclasses.asdict(self.setting).items() if k != "values" or v},
            "label": self.setting.label,
            "model_path": self.model_path.name,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "params": self.params,
            "compression": self.compression,
            "metric": self.metric,
        }


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a model directory's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.is_file()) if path.is_dir() else [path]:
        h.update(f"{p.name if path.is_dir() else ''};".encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(
    *,
    baseline_digest: str,
    bundle: DatasetBundle,
    data_root: str | os.PathLike[str] | None,
    config: TrainConfig,
    plan: Plan,
    setting: SweepSetting,
    teacher_digest: str | None,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that determines a setting's result, and nothing else (device, workers, logging).

    ``calibration`` describes the calibration sample (``None``: data-free decomposition). The
    setting's directory is named after a hash of this.
    """
    return {
        "ttcompress": __version__,
        "baseline": baseline_digest,
        "data": bundle.name,
        "data_root": str(Path(data_root).expanduser().resolve()) if data_root is not None else None,
        "config": {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE_OPTIONS},
        "plan": plan.to_dict(),
        "setting": dataclasses.asdict(setting),
        "teacher": teacher_digest,
        "calibration": dict(calibration) if calibration is not None else None,
        # text data: the sequence length and tokenizer (in the split's description) change the data
        **({"text": bundle.split} if bundle.targets == "tokens" else {}),
    }


def _write_json(path: Path, data: Any) -> None:
    from ttcompress.fsutil import atomic_write

    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


SweepLog = Callable[[str], None]


def calibration_subset(bundle: DatasetBundle, *, samples: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``samples`` class-balanced, seeded inputs of ``bundle``'s training split, and their description.

    The sample ``decompose --data`` draws (:func:`ttcompress.data.balanced_subset`); the
    description is what a checkpoint records under ``info["calibration"]``.

    Raises
    ------
    UserInputError
        ``samples`` is not a positive int (a ``ValueError``).
    DataError
        The training split is empty.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError("calib_samples", f"must be a positive int, got {samples!r}")
    if len(bundle.train) == 0:
        raise DataError(f"dataset {bundle.name!r} has an empty training split; nothing to calibrate on")
    subset = balanced_subset(bundle.train, min(samples, len(bundle.train)), seed=seed)
    return subset, {"dataset": bundle.name, "samples": len(subset), "seed": seed, "split": "train", "balanced": True}


def _check_sweep_inputs(
    settings: Sequence[SweepSetting], baseline: Path, bundle: DatasetBundle, out: Path,
    base_plan: Plan | None, plan_options: Mapping[str, Any] | None,
) -> None:
    """Everything :func:`run_sweep` can refuse before any work: settings, baseline, labels, output, plans."""
    if not settings:
        raise ValueError("settings must not be empty")
    if not (baseline.is_file() or baseline.is_dir()):  # a file, or a Hugging Face directory
        raise FileNotFoundError(f"baseline model not found: {baseline}")
    if not bundle.has_labels and bundle.targets != "tokens":
        raise DataError(f"a sweep ranks settings by top-1 accuracy (perplexity on text), and data {bundle.name!r} has no class labels "
                        f"(targets: {bundle.targets}); use finetune and report --metric instead")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"sweep output is not a directory: {out}")
    for setting in settings:  # bad plan options fail before any work
        setting.plan(base_plan, **dict(plan_options or {}))


def run_sweep(
    baseline: str | os.PathLike[str],
    *,
    bundle: DatasetBundle,
    settings: Sequence[SweepSetting],
    output_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    base_plan: Plan | None = None,
    plan_options: Mapping[str, Any] | None = None,
    calib_samples: int | None = DEFAULT_CALIB_SAMPLES,
    calib_memory: int | str | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    log: SweepLog | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> list[SweepResult]:
    """Run (or resume) a sweep of ``settings`` from the model file ``baseline``.

    Parameters
    ----------
    baseline : path
        The dense model (any input :func:`ttcompress.checkpoint.io.load` accepts).
    bundle : DatasetBundle
        Fine-tuning uses its train split; accuracy is measured on its test split.
    settings : sequence of SweepSetting
        From :func:`sweep_settings`.
    output_dir : path
        Per-setting directories and the cache (see the module docstring).
    config : TrainConfig, optional
        Fine-tuning options (default :class:`~ttcompress.training.config.FinetuneConfig`).
    base_plan : Plan, optional
        Patterns and rules shared by all settings (its TT/CP defaults are replaced per setting).
    plan_options : mapping, optional
        ``formats``, ``layers``, ``exclude``, ``min_saving`` and ``max_error``, shared by all
        settings, as :func:`~ttcompress.compression.planfile.plan_from_options` takes them.
    calib_samples : int or None, default :data:`~ttcompress.calibration.data.DEFAULT_CALIB_SAMPLES`
        Calibrate every decomposition (``compress(..., calib_data=...)``) on this many
        class-balanced samples of ``bundle``'s training split, drawn with ``config.seed``
        (:func:`calibration_subset`), as ``decompose --data`` does; ``None``: data-free.
    arch, arch_kwargs, trust_pickle, trust_code
        As for :func:`ttcompress.checkpoint.io.load` (the cached models are loaded with the same ``arch`` and
        ``trust_code``).
    teacher : nn.Module, optional
        Distil from this model while fine-tuning (e.g. the baseline).
    progress : TrainCallback, optional
        Fine-tuning progress (rank 0).
    log : callable, optional
        Receives one line per step of the sweep.
    data_root : path, optional
        Where ``bundle`` was read from; part of the cache key.

    Returns
    -------
    list of SweepResult
        In the order of ``settings``.
    """
    config = config or FinetuneConfig()
    baseline, out = Path(baseline), Path(output_dir)
    _check_sweep_inputs(settings, baseline, bundle, out, base_plan, plan_options)
    digest = _file_digest(baseline)
    calib, calib_info = (None, None) if calib_samples is None else calibration_subset(
        bundle, samples=calib_samples, seed=config.seed)
    memory = None if calib_memory is None else check_calib_memory(calib_memory)
    if calib_info is not None and memory is not None:  # a budget can change the statistics: part of the key
        calib_info = {**calib_info, "memory": memory}
    if calib is not None:
        with named_calibration(calib_info):  # non-finite samples are refused before any work
            for _batch in calib_batches(calib):
                pass
    base_model = load(baseline, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs,
                      trust_code=trust_code)  # read once
    check_finite_parameters(base_model)
    check_model_fits(base_model, bundle, what=f"baseline {baseline.name!r}")
    for setting in settings:  # a plan that does not fit the model's layers fails before anything is written
        try:
            plan_layers(base_model, setting.plan(base_plan, **dict(plan_options or {})))
        except InputError as exc:  # one setting's target ratio: the sweep's flag is --target-ratios
            if exc.param != "target_ratio":
                raise
            raise InputError("target_ratios", exc.problem) from exc
    out.mkdir(parents=True, exist_ok=True)
    run = _SweepRun(
        baseline=baseline, bundle=bundle, config=config, base_plan=base_plan, plan_options=dict(plan_options or {}), out=out, digest=digest,
        base_model=base_model, base_params=count_params(base_model), teacher=teacher,
        teacher_digest=_weights_digest(teacher) if teacher is not None else None,
        cached=_cached_load_kwargs(arch, arch_kwargs, trust_code), data_root=data_root, progress=progress,
        say=log or (lambda _line: None), calib=calib, calib_info=calib_info, calib_memory=memory,
    )
    return [_run_setting(run, setting, f"[{i}/{len(settings)}] {setting.label}") for i, setting in enumerate(settings, 1)]


@dataclass(frozen=True)
class _SweepRun:
    """What every setting of one :func:`run_sweep` shares."""

    baseline: Path
    bundle: DatasetBundle
    config: TrainConfig
    base_plan: Plan | None
    plan_options: dict[str, Any]
    out: Path
    digest: str
    base_model: nn.Module
    base_params: int
    teacher: nn.Module | None
    teacher_digest: str | None
    cached: dict[str, Any]
    data_root: str | os.PathLike[str] | None
    progress: TrainCallback | None
    say: SweepLog
    calib: Any = None
    calib_info: dict[str, Any] | None = None
    calib_memory: int | None = None

    @property
    def metric(self) -> str:
        """``"perplexity"`` on text data (lower is better), else ``"top-1"``."""
        return "perplexity" if self.bundle.targets == "tokens" else "top-1"

    def evaluate(self, model: nn.Module) -> float:
        device = _eval_device(self.config.device if self.config.device != "auto" else None)
        if self.metric == "perplexity":
            return perplexity(model, self.bundle.test, device=device, batch_size=self.config.eval_batch_size)
        return evaluate(model, self.bundle.test, device=device).accuracy

    def show(self, value: float) -> str:
        """A measured value for the log: ``97.50%`` or ``perplexity 18.5``."""
        return f"perplexity {value:.4g}" if self.metric == "perplexity" else f"{100 * value:.2f}%"


def _run_setting(run: _SweepRun, setting: SweepSetting, head: str) -> SweepResult:
    """One setting: its cached result, or decompose (or reuse the decomposed model), fine-tune, measure."""
    plan = setting.plan(run.base_plan, **run.plan_options)
    fp = _fingerprint(cache_key(baseline_digest=run.digest, bundle=run.bundle, data_root=run.data_root,
                                config=run.config, plan=plan, setting=setting, teacher_digest=run.teacher_digest,
                                calibration=run.calib_info))
    work = run.out / f"{setting.key}-{fp}"
    work.mkdir(exist_ok=True)
    result_file = work / "result.json"
    model_path = work / "model.pt"
    if result_file.is_file():
        data = json.loads(result_file.read_text(encoding="utf-8"))
        run.say(f"{head}: cached ({run.show(data['accuracy_after'])}) in {model_path}")
        return SweepResult(setting, model_path, data["accuracy_before"], data["accuracy_after"],
                           data["params"], data["compression"], cached=True, metric=run.metric)  # fmt: skip
    model, accuracy_before = _decomposed(run, setting, plan, work, head)
    run.say(f"{head}: {run.show(accuracy_before)} before fine-tuning; fine-tuning")
    resume = run_paths(model_path).resume.is_file()
    done = finetune(model, run.bundle, output=model_path, config=run.config, teacher=run.teacher,
                    progress=run.progress, resume=resume)  # fmt: skip
    if done.interrupted:
        raise KeyboardInterrupt
    best = load(model_path, **run.cached)
    params = count_params(best)
    result = SweepResult(setting, model_path, accuracy_before, run.evaluate(best), params, run.base_params / params,
                         metric=run.metric)  # fmt: skip
    _write_json(result_file, result.to_dict())
    run.say(f"{head}: {run.show(result.accuracy_after)} after fine-tuning, {result.compression:.2f}× fewer params; "
            f"wrote {model_path}")
    return result


def _decomposed(run: _SweepRun, setting: SweepSetting, plan: Plan, work: Path, head: str) -> tuple[nn.Module, float]:
    """The setting's decomposed model and its accuracy before fine-tuning (reused from ``work`` if there)."""
    decomposed = work / "decomposed.pt"
    before_file = work / "decomposed.json"
    if decomposed.is_file() and before_file.is_file():
        run.say(f"{head}: reusing the decomposed model")
        return load(decomposed, **run.cached), json.loads(before_file.read_text(encoding="utf-8"))["accuracy"]
    run.say(f"{head}: decomposing" + (f", calibrated on {run.calib_info['samples']} samples" if run.calib_info else ""))
    # the one pipeline, as decompose runs it: forward-checked, the plan, calibration and source recorded
    options = CompressOptions(plan=plan, calib_data=run.calib, calib_memory=run.calib_memory,
                              calib_info=run.calib_info, check_input=AUTO_CHECK, source=run.baseline,
                              device=run.config.device)
    model = run_compress(copy.deepcopy(run.base_model), options).model
    save(model, decomposed, info={"sweep_setting": dataclasses.asdict(setting)})
    accuracy_before = run.evaluate(model)
    _write_json(before_file, {"accuracy": accuracy_before})
    return model, accuracy_before


def _eval_device(device: str | None) -> torch.device:
    return resolve_device(device or "auto")


def default_output_dir(baseline: str | os.PathLike[str]) -> Path:
    """``dir/baseline.pt`` → ``dir/baseline.sweep``."""
    p = Path(baseline)
    return p.with_name(p.stem + ".sweep")


def sweep_report(
    baseline: str | os.PathLike[str],
    *,
    settings: Sequence[SweepSetting],
    output_dir: str | os.PathLike[str] | None = None,
    data: str = "mnist-5k",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    config: TrainConfig | None = None,
    plan_file: str | os.PathLike[str] | None = None,
    plan_options: Mapping[str, Any] | None = None,
    calib_samples: int | None = DEFAULT_CALIB_SAMPLES,
    calib_memory: int | str | None = None,
    distill: bool = True,
    teacher: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
    measure_speed: bool = True,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    console: Any = None,
    progress: TrainCallback | None = None,
) -> Any:
    """Run (or resume) a sweep and measure every fine-tuned model against the baseline.

    What ``ttcompress sweep`` runs. ``console`` (a rich console) receives one line per step and
    ``progress`` the hooks of every fine-tuning run (the CLI passes
    :class:`ttcompress.cli.progress.RichProgress`); the result is a :class:`ttcompress.report.compare.Report`
    whose rows carry the accuracy before fine-tuning.

    ``plan_options`` (``formats``, ``layers``, ``exclude``, ``min_saving``, ``max_error``) apply to
    every setting. Each decomposition is calibrated on ``calib_samples`` samples of ``data``'s
    training split (``None``: data-free), see :func:`run_sweep`. Fine-tuning distils from
    ``teacher`` (a model file) when given, else from the baseline unless ``distill=False``: the
    defaults of ``decompose`` + ``finetune`` (which distils from the source model ``decompose``
    recorded), so a sweep point is the model those commands give.

    ``text:`` data (tokenized with ``tokenizer``, default the baseline's, into sequences of
    ``seq_len`` tokens) ranks settings by validation perplexity instead of top-1, and the report
    measures ``metric="perplexity"``.
    """
    from ttcompress.data import load_dataset, text_tokenizer
    from ttcompress.report.compare import ModelEntry, build_report

    config = config or FinetuneConfig()
    bundle = load_dataset(data, root=data_root, download=download, image_size=image_size,
                          tokenizer=text_tokenizer(data, tokenizer, baseline), seq_len=seq_len)  # fmt: skip
    base_plan = load_plan(plan_file) if plan_file is not None else None
    out = Path(output_dir) if output_dir is not None else default_output_dir(baseline)
    load_kwargs: dict[str, Any] = {"trust_pickle": trust_pickle, "trust_code": trust_code}
    if arch is not None:
        load_kwargs.update(arch=arch, arch_kwargs=dict(arch_kwargs) if arch_kwargs else None)
    base_model = load(baseline, **load_kwargs)
    teacher_model = None if teacher is None else load_teacher(  # a state dict gets the baseline's arch
        teacher, student=base_model, student_arch=arch, trust_pickle=trust_pickle, trust_code=trust_code)
    results = run_sweep(
        baseline, bundle=bundle, settings=settings, output_dir=out, config=config, base_plan=base_plan,
        plan_options=plan_options, calib_samples=calib_samples, calib_memory=calib_memory, arch=arch,
        arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, trust_code=trust_code,
        teacher=teacher_model if teacher_model is not None else (base_model if distill else None), progress=progress, data_root=data_root,
        log=console.print if console is not None else None,
    )  # fmt: skip
    entries = [
        ModelEntry(label=r.setting.label, model=load(r.model_path, **_cached_load_kwargs(arch, arch_kwargs, trust_code)),
                   path=r.model_path, setting=r.setting.key,
                   accuracy_before_finetune=r.accuracy_before if r.metric == "top-1" else None)  # fmt: skip
        for r in results
    ]
    return build_report(
        baseline=ModelEntry(label=Path(baseline).stem, model=base_model, path=Path(baseline)),
        models=entries,
        data=bundle,
        device=resolve_device(config.device),
        measure_speed=measure_speed,
        metric="perplexity" if bundle.targets == "tokens" else None,
    )


def _cached_load_kwargs(arch: str | None, arch_kwargs: dict[str, Any] | None, trust_code: bool) -> dict[str, Any]:
    """How to load the sweep's own checkpoints: they record the baseline's arch, which the user named."""
    kwargs: dict[str, Any] = {"trust_code": trust_code}
    if arch is not None:
        kwargs.update(arch=arch, arch_kwargs=arch_kwargs)
    return kwargs
