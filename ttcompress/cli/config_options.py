"""The training options of ``train``, ``finetune`` and ``sweep``, generated from the config dataclasses.

Every field of :class:`~ttcompress.training.config.TrainConfig` that carries a
:class:`~ttcompress.training.config.CliOption` (its flag, help, value name and help panel) becomes one
Typer option, with the default of the command's config class (``FinetuneConfig``'s for ``finetune``
and ``sweep``). :func:`config_options` adds them to a command in place of its ``config`` parameter
and hands the command the validated config::

    @app.command("train")
    @cli_errors
    @config_options(TrainConfig, command="train")
    def train(arch: ..., config: TrainConfig, resume: ...) -> None: ...

A new training option is one field with ``option(...)`` in ``ttcompress/training/config.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer

from ttcompress.training.config import TrainConfig, cli_options

__all__ = ["config_options", "config_parameters", "field_option"]

F = TypeVar("F", bound=Callable[..., Any])


def _optional(tp: Any) -> Any:
    """``X | None`` as ``Optional[X]`` (the form every Typer version reads)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return Optional[inner[0]]
    return tp


def config_parameters(cls: type[TrainConfig], command: str) -> list[inspect.Parameter]:
    """One keyword parameter, annotated with its ``typer.Option``, per command-line field of ``cls`` that
    ``command`` takes; the defaults are ``cls``'s."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    params = []
    for name, cli in cli_options(cls).items():
        if command and command not in cli.commands:
            continue
        default = defaults[name]
        info = typer.Option(cli.flag, help=cli.help, metavar=cli.metavar, rich_help_panel=cli.panel,
                            show_default=default is not None)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_optional(hints[name]), info]))
    return params


def field_option(cls: type[TrainConfig], name: str) -> Any:
    """The ``Annotated`` Typer option of one field of ``cls``, for a command that takes it alone (``report
    --device``)."""
    [param] = [p for p in config_parameters(cls, command="") if p.name == name] or [None]
    if param is None:
        raise KeyError(f"{cls.__name__}.{name} is not a command-line option")
    return param.annotation


def config_options(cls: type[TrainConfig], *, command: str) -> Callable[[F], F]:
    """Decorate a command whose ``config`` parameter is replaced by ``cls``'s options (see the module)."""

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        if "config" not in sig.parameters:
            raise TypeError(f"{func.__name__} has no 'config' parameter")
        generated = config_parameters(cls, command)
        names = {p.name for p in generated}
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name == "config":
                params.extend(generated)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            fields = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return func(config=cls(**fields), **kwargs)  # validated by the config itself

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return typing.cast(F, wrapper)

    return decorate
