"""Library parameter names -> command-line flags, and the per-format flags generated from the registry.

The library's errors are :class:`~ttcompress.errors.InputError`\\ s naming a parameter
(``tt.ranks``, ``target_ratio``, ``calib_samples``); the CLI answers them with that parameter's
flag, looked up in one table (:func:`flag_for`): ``--tt-ranks 0`` is answered with
``tt.ranks (--tt-ranks) must be a positive integer, got 0``. No message is parsed.

The plan flags of each registered format are not written out anywhere: :func:`format_flags`
derives them from the fields of the format's settings class that are declared with a ``help``
(:func:`ttcompress.formats.base.setting`), and :func:`with_format_flags` puts them, with the
generic ``--set FORMAT.FIELD=VALUE``, on ``decompose``, ``inspect`` and ``sweep`` alike. A format
registered before a command's module is imported gets its flags there with no other change.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Optional, TypeVar

import typer

from ttcompress.errors import InputError, UserInputError

__all__ = [
    "PLAN_FLAGS",
    "FormatFlag",
    "SET_PARAM",
    "flag_for",
    "format_flags",
    "parse_set",
    "split_values",
    "with_format_flags",
]

#: The parameter name of ``--set`` (errors about a ``FORMAT.FIELD`` that does not exist name it).
SET_PARAM = "set"

#: Parameters of the library that a command-line flag sets, other than the formats' settings (which
#: :func:`format_flags` adds): parameter -> flag. Every command that takes the parameter names it
#: with the same flag (``arch_kwargs`` is ``--arch-kwargs`` in ``train``, ``decompose``, ``sweep``, ...).
PLAN_FLAGS: Mapping[str, str] = {
    "target_ratio": "--target-ratio",
    "target_ratios": "--target-ratios",
    "layers": "--layers",
    "exclude": "--exclude",
    "formats": "--format",
    "min_saving": "--min-saving",
    "max_error": "--max-error",
    "calib_samples": "--calib-samples",
    "calib_memory": "--calib-memory",
    "plan_file": "--plan",
    "teacher": "--teacher",
    "distill": "--distill",
    SET_PARAM: "--set",
    "arch": "--arch",
    "arch_kwargs": "--arch-kwargs",
    "teacher_arch": "--teacher-arch",
    "teacher_arch_kwargs": "--teacher-arch-kwargs",
    "input_shape": "--input-shape",
    "data": "--data",
    "calib_data": "--data",
    "seq_len": "--seq-len",
    "tokenizer": "--tokenizer",
}  # fmt: skip

_KINDS: dict[str, type] = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class FormatFlag:
    """One generated flag: the setting it sets (``param``, ``FORMAT.FIELD``), its name, the Python
    parameter it becomes (``dest``), how its text is parsed, its help and metavar, and whether it
    fixes a layer's size (then ``none`` keeps the format's layers dense)."""

    param: str
    flag: str
    dest: str
    kind: type
    help: str
    metavar: str
    size: bool


def format_flags() -> tuple[FormatFlag, ...]:
    """The flags of every registered format's settings fields that are declared with a ``help``, in
    registration order (``--tt-ranks``, ``--tt-eps``, ``--tt-d``, ``--cp-ranks``, ``--cp-ratio``, ...)."""
    from ttcompress.formats import format_names, get_format  # the registry imports torch: only when asked
    from ttcompress.formats.base import SIZE, setting_fields

    out = []
    for name in format_names():
        for f in setting_fields(get_format(name).settings):
            if not f.help:
                continue
            flag = f.flag or f"--{name}-{f.name}".replace("_", "-")
            metavar = f.metavar or f.kind.upper()
            out.append(FormatFlag(f"{name}.{f.name}", flag, flag[2:].replace("-", "_"), _KINDS[f.kind], f.help, metavar,
                                  f.group == SIZE))
    return tuple(out)


def flag_for(param: str) -> str | None:
    """The command-line flag that sets library parameter ``param`` (None: no flag sets it)."""
    from ttcompress.compression.planfile import SHORTHANDS  # imports torch: only once an error is reported

    if param in PLAN_FLAGS:
        return PLAN_FLAGS[param]
    param = SHORTHANDS.get(param, param)  # tt_ranks: the shorthand of tt.ranks
    if "." not in param:
        return None
    return next((f.flag for f in format_flags() if f.param == param), None)


def with_flag(exc: InputError) -> str:
    """The message of ``exc`` with its parameter's flag: ``tt.ranks (--tt-ranks) must be ...``."""
    flag = flag_for(exc.param)
    if flag is None:
        return str(exc)
    return str(InputError(f"{exc.param} ({flag})", exc.problem))


def split_values(text: str) -> list[str]:
    """``"4,[16,32],none"`` -> ``["4", "[16,32]", "none"]``: commas inside brackets do not split."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [t.strip() for t in items if t.strip()]


def _value(text: str, param: str, kind: type) -> Any:
    """One ``--set`` value: ``none``, a JSON list or object (``[16,32]``), or a ``kind``."""
    if text.lower() == "none":
        return "none"
    try:
        return json.loads(text) if text[:1] in "[{" else kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, "a value")
        raise InputError(SET_PARAM, f": {param} must be {what}, a JSON list or none, got {text!r}") from None


def parse_set(items: list[str] | None, *, lists: bool = False) -> dict[str, Any]:
    """``--set FORMAT.FIELD=VALUE`` items as ``{"FORMAT.FIELD": value}`` (with ``lists``: lists of
    values, ``FORMAT.FIELD=V1,V2``, one sweep axis each)."""
    from ttcompress.compression.planfile import split_param
    from ttcompress.formats import get_format
    from ttcompress.formats.base import setting_fields

    out: dict[str, Any] = {}
    for item in items or ():
        param, eq, text = item.partition("=")
        param, text = param.strip(), text.strip()
        if not eq or not text:
            raise InputError(SET_PARAM, f"takes FORMAT.FIELD=VALUE (e.g. --set svd.rank=16), got {item!r}")
        fmt_name, field = split_param(param)
        param = f"{fmt_name}.{field}"
        if param in out:
            raise InputError(SET_PARAM, f": {param} is given twice")
        meta = next(f for f in setting_fields(get_format(fmt_name).settings) if f.name == field)
        kind = _KINDS[meta.kind]
        if lists:
            out[param] = [_value(t, param, kind) for t in split_values(text)]
        elif len(split_values(text)) > 1 and text[:1] not in "[{":
            raise UserInputError(f"--set {param} takes one value here, got {text!r}; lists of values are for "
                                 f"`ttcompress sweep` (e.g. sweep --set {param}={text})")
        else:
            out[param] = _value(text, param, kind)
    return out


F = TypeVar("F", bound=Callable[..., Any])
_ONE, _LIST = "Ranks (pick at most one way per format)", "Sweep axes (comma-separated lists; each value is one setting)"
_NONE_HELP = " 'none' keeps those layers dense."
_SET_HELP = ("Set any format's setting, FORMAT.FIELD=VALUE (e.g. svd.rank=16, tucker2.ranks=[16,32], cp.options="
             "'{\"n_iter_max\": 50}'); repeatable. Counts as that format's option, as its own flag would.")


def with_format_flags(*, lists: bool = False) -> Callable[[F], F]:
    """Decorator of a command function with a parameter ``format_flags``: that parameter is replaced,
    in the signature typer reads, by one option per :func:`format_flags` entry and ``--set``
    (repeatable); the function receives their values as one dict, ``{dest: text or None, ...,
    "set": [...]}``. With ``lists`` (``sweep``) the options take comma-separated lists."""

    def decorate(fn: F) -> F:
        flags = format_flags()
        sig = inspect.signature(fn, eval_str=True)
        generated = []
        for f in flags:
            none = _NONE_HELP if f.size and "'none'" not in f.help else ""
            help_text = f.help + none if not lists else f"{f.help}{none} Comma-separated values, one setting each."
            option = typer.Option(f.flag, help=help_text, show_default=False,
                                  metavar="LIST" if lists else f.metavar, rich_help_panel=_LIST if lists else _ONE)
            generated.append(inspect.Parameter(f.dest, inspect.Parameter.KEYWORD_ONLY,
                                               annotation=Annotated[Optional[str], option], default=None))
        set_option = typer.Option("--set", help=_SET_HELP + (" In sweep: FORMAT.FIELD=V1,V2 is an axis." if lists else ""),
                                  show_default=False, metavar="FORMAT.FIELD=VALUE",
                                  rich_help_panel=_LIST if lists else _ONE)
        generated.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY,
                                           annotation=Annotated[Optional[list[str]], set_option], default=None))
        params = []
        for p in sig.parameters.values():
            if p.name == "format_flags":
                params.extend(g.replace(kind=p.kind) for g in generated)
            else:
                params.append(p)
        dests = [f.dest for f in flags]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, Any] = {d: kwargs.pop(d, None) for d in dests}
            values[SET_PARAM] = kwargs.pop("set_", None)
            return fn(*args, format_flags=values, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate
