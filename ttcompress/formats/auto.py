"""The ``auto`` format: per layer, the registered format with the lowest error at the layer's budget.

For each layer, the parameter budget is what the layer's default format (TT for Linear, CP for
Conv2d, under the plan's settings or the target-ratio allocation) would use. Every registered
format that compresses the layer type is then built at the largest structure within that budget
(:meth:`~ttcompress.formats.base.CompressionFormat.fit_budget`), and the one with the lowest
relative Frobenius error of the weight wins (with calibration statistics: the lowest relative
output error after fitting). Errors within ``tie_tol`` of the best are a tie,
broken by the fewest multiply-adds (:meth:`~ttcompress.formats.base.CompressionFormat.flops`),
then by registration order. A FLOP count stands in for measured speed: timing every candidate of
every layer would cost more than the decompositions and would make the choice depend on the
machine's load, while the choice must be reproducible. The built layer carries a note saying
which format won and why; it appears in the decompose table and the checkpoint's layer record.

Candidates are compared by their trial builds
(:meth:`~ttcompress.formats.base.CompressionFormat.build_trial`) and only the winner is finished
(:meth:`~ttcompress.formats.base.CompressionFormat.finish_trial`). For most formats the trial is
the full build. CP's is a shortened CP-ALS fit (at most ``TRIAL_SWEEPS`` sweeps, see
:mod:`ttcompress.formats.cp`) whose error can only fall when the fit goes on: a CP candidate that
wins is fitted to the end from where its trial stopped (same iterates as one uninterrupted fit),
one that loses is never fitted further, so the note gives its trial error. At the ranks a
target ratio asks for (hundreds to thousands) the full fit is most of the time ``auto`` takes;
``docs/benchmarks.md`` ("Decomposition time") gives the time saved and the measured change in
the chosen layers' errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ttcompress.errors import InputError
from ttcompress.memory import RELEASE_AFTER_VALUES, release_freed
from ttcompress.formats.base import (
    EXACT,
    BuildResult,
    CompressionFormat,
    ErrorPreview,
    FormatDescription,
    Ladder,
    LayerDecision,
    dense_params,
    setting,
)
from ttcompress.formats.checks import check_patterns
from ttcompress.formats.registry import (
    default_format,
    format_names,
    format_of,
    formats_for,
    get_format,
    register_format,
)

__all__ = ["AutoFormat", "AutoSettings", "Trial", "choose"]

_PRIVATE = ("budget", "reference", "trials", "tie_tol", "candidates")


@dataclass(frozen=True)
class AutoSettings:
    """Options of the ``auto`` format.

    Parameters
    ----------
    candidates : tuple of str
        Formats to compare (default: every registered format that compresses the layer).
    tie_tol : float
        Relative errors within this of the best count as a tie (default 1e-3).
    """

    candidates: tuple[str, ...] = setting((), kind="str")
    tie_tol: float = setting(1e-3, kind="float")

    def __post_init__(self) -> None:
        names = check_patterns(self.candidates, "auto.candidates")
        for n in names:
            if n not in format_names() or get_format(n).layer_class is None:
                raise InputError("auto.candidates", f": {n!r} is not a format with a layer of its own")
        object.__setattr__(self, "candidates", names)
        if isinstance(self.tie_tol, bool) or not isinstance(self.tie_tol, (int, float)) or not 0 <= self.tie_tol < 1:
            raise InputError("auto.tie_tol", f"must be in [0, 1), got {self.tie_tol!r}")
        object.__setattr__(self, "tie_tol", float(self.tie_tol))


@dataclass(frozen=True)
class Trial:
    """One candidate of an ``auto`` choice: its format, size, error and cost."""

    format: str
    params: int
    rel_error: float
    flops: int


def choose(trials: list[Trial], *, tie_tol: float) -> tuple[Trial, str]:
    """The winning trial and a one-line reason (lowest error; ties by FLOPs, then list order)."""
    if not trials:
        raise ValueError("trials must not be empty")
    best = min(t.rel_error for t in trials)
    tied = [t for t in trials if t.rel_error - best <= tie_tol]
    winner = min(tied, key=lambda t: t.flops)  # min keeps the first of equals: registration order
    others = ", ".join(f"{t.format} {t.rel_error:.4f}" for t in trials if t is not winner)
    why = f"auto: {winner.format} has the lowest error {winner.rel_error:.4f} at {winner.params} params"
    if len(tied) > 1:
        why = (f"auto: {winner.format} ties within {tie_tol:g} on error ({winner.rel_error:.4f}) and needs the "
               f"fewest multiply-adds ({winner.flops})")
    return winner, why + (f" (vs {others})" if others else "")


def _trial(fmt: CompressionFormat, built: BuildResult) -> Trial:
    """A build's facts as a candidate (with calibration data, its output error after fitting)."""
    err = built.fit.error_after if built.fit is not None else built.error
    return Trial(fmt.name, dense_params(built.layer), float("inf") if err is None else float(err), fmt.flops(built.layer))


@register_format
class AutoFormat(CompressionFormat):
    """Per layer, the best registered format at the default format's parameter budget."""

    name = "auto"
    targets = (nn.Linear, nn.Conv2d)
    layer_class = None
    settings = AutoSettings
    default_under_target_ratio = True
    summary = "per layer, the format with the lowest error at the same parameter budget"

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, self.targets) and default_format(module) is not None

    def _candidates(self, module: nn.Module, settings: AutoSettings) -> list[CompressionFormat]:
        found = formats_for(module)
        if settings.candidates:
            found = tuple(f for f in found if f.name in settings.candidates)
        return list(found)

    def decide(self, module: nn.Module, name: str, settings: Any, *, override: Mapping[str, Any] | None = None,
               aliases: tuple[str, ...] = (), lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        """The reference format's decision (a rule's ``override`` is its: ``auto`` delegates sizes),
        with the candidates to compare at its parameter budget."""
        s = settings if settings is not None else AutoSettings()
        ref = default_format(module)
        if ref is None:
            return self.dense_decision(module, name, f"no format compresses {type(module).__name__}", aliases)
        of = settings_of if settings_of is not None else (lambda n: get_format(n).settings())
        dec = ref.decide(module, name, of(ref.name), override=override, aliases=aliases, lowest=lowest,
                         settings_of=of)
        if dec.skipped is not None:
            return dec
        if dec.params_after is None:
            raise InputError(f"layer {name!r}", f": the auto format compares formats at a parameter budget; give "
                             f"{ref.name} ranks or a ratio, not only an error bound")
        trials = self._trials(module, dec.params_after, ref.name, dec.options, s, of)
        options = {**dec.options, "budget": dec.params_after, "reference": ref.name, "trials": trials,
                   "tie_tol": s.tie_tol, "candidates": list(s.candidates)}
        return replace(dec, format=self.name, options=options)

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        return self.decide(module, name, settings, aliases=aliases, lowest=lowest, settings_of=settings_of)

    def _trials(self, module: nn.Module, budget: int, reference: str, ref_options: Mapping[str, Any],
                settings: AutoSettings, settings_of: Any) -> dict[str, dict[str, Any]]:
        trials: dict[str, dict[str, Any]] = {}
        for fmt in self._candidates(module, settings):
            opts = dict(ref_options) if fmt.name == reference else fmt.fit_budget(module, budget, settings_of(fmt.name))
            if opts is not None:
                trials[fmt.name] = opts
        return trials

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        trials = dict(options.get("trials") or {})
        if not trials:
            raise ValueError(f"layer {name!r}: auto has no candidate format within the budget")
        built: dict[str, BuildResult] = {}
        results: list[Trial] = []
        for fmt_name, opts in trials.items():
            fmt = get_format(fmt_name)
            built[fmt_name] = fmt.build_trial(module, opts, calib=calib, name=name)
            results.append(_trial(fmt, built[fmt_name]))
            if module.weight.numel() >= RELEASE_AFTER_VALUES:
                release_freed()  # the trial's temporaries, before the next candidate's add on top
        winner, _ = choose(results, tie_tol=float(options.get("tie_tol", AutoSettings().tie_tol)))
        fmt = get_format(winner.format)
        done = fmt.finish_trial(module, built[winner.format], trials[winner.format], calib=calib, name=name)
        results = [_trial(fmt, done) if t is winner else t for t in results]
        winner, why = choose(results, tie_tol=float(options.get("tie_tol", AutoSettings().tie_tol)))
        return dataclasses.replace(done, note=why)

    def preview_cost(self, module: nn.Module, options: Mapping[str, Any]) -> float:
        """The candidates' costs together (each is built to be compared)."""
        return sum(get_format(n).preview_cost(module, o) for n, o in (options.get("trials") or {}).items())

    def preview(self, module: nn.Module, options: Mapping[str, Any], *, budget: float) -> ErrorPreview | None:
        """The format ``auto`` would pick and its data-free error.

        Within ``budget`` this is :meth:`build` itself (the same choice and error as the real run).
        Otherwise each candidate gives its own preview (exact where within ``budget``, else its
        estimate or bound) and :func:`choose` picks on those; FLOPs are not known without building,
        so ties go to the first candidate, and the note says the choice rests on estimates.
        """
        if self.preview_cost(module, options) <= budget:
            built = self.build(module, options)
            fmt = format_of(built.layer)
            return ErrorPreview(float(built.layer.rel_error), EXACT, fmt.name if fmt is not None else self.name,
                                built.note, dense_params(built.layer))
        previews: dict[str, ErrorPreview] = {}
        for fmt_name, opts in (options.get("trials") or {}).items():
            p = get_format(fmt_name).preview(module, opts, budget=budget)
            if p is not None:
                previews[fmt_name] = p
        if not previews:
            return None
        trials = [Trial(n, int(options.get("budget") or 0), p.error, 0) for n, p in previews.items()]
        winner, why = choose(trials, tie_tol=float(options.get("tie_tol", AutoSettings().tie_tol)))
        best = previews[winner.format]
        kinds = ", ".join(f"{n} {p.kind}" for n, p in previews.items())
        return ErrorPreview(best.error, best.kind, best.format, f"{why}; chosen on previews ({kinds})")

    def rebuild(self, config: Mapping[str, Any]) -> nn.Module:
        raise ValueError("auto layers are recorded under the format that won; there is no auto layer to rebuild")

    def describe(self, layer: nn.Module) -> FormatDescription:
        raise ValueError("auto has no layer of its own; describe the layer with the format that won")

    def suggest(self, decision: LayerDecision) -> str:
        trials = decision.options.get("trials") or {}
        return f"auto among {', '.join(trials)} at {decision.options.get('budget')} params"

    def ladder(self, module: nn.Module, decision: LayerDecision) -> Ladder | None:
        ref = get_format(decision.options["reference"])
        ref_options = {k: v for k, v in decision.options.items() if k not in _PRIVATE}
        inner = ref.ladder(module, replace(decision, format=ref.name, options=ref_options))
        if inner is None:
            return None
        tie_tol, candidates = decision.options["tie_tol"], decision.options["candidates"]
        settings = AutoSettings(candidates=tuple(candidates), tie_tol=tie_tol)
        defaults = {n: get_format(n).settings() for n in format_names()}
        options = tuple(
            {**opt, "budget": p, "reference": ref.name, "tie_tol": tie_tol, "candidates": list(candidates),
             "trials": self._trials(module, p, ref.name, opt, settings, defaults.__getitem__)}
            for p, opt in zip(inner.params, inner.options)
        )
        return Ladder(inner.params, inner.errors, options)
