"""The option reference (``docs/options.md``), generated from the command line itself and the configs.

``docs/cli.md`` explains the commands; the tables of every option, its value and its default, and
the fields of :class:`~ttcompress.training.TrainConfig` / :class:`~ttcompress.training.FinetuneConfig`
with their defaults, are produced here from the Typer commands and the dataclasses, so they cannot
drift from the code: ``tests/test_docs_reference.py`` fails when ``docs/options.md`` differs from
what this module renders. Regenerate with ``python -m ttcompress.cli.reference docs/options.md``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

__all__ = ["config_table", "options_table", "render_reference"]

_HEADER = """# Option reference

Generated from the code by `python -m ttcompress.cli.reference docs/options.md` (a test fails when
this page and the code differ). What each option does, with examples, is in [cli.md](cli.md);
the Python configs are in [api.md](api.md).
"""


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param: Any) -> str:
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return "off"
    default = param.default
    if callable(default) or default is None or default == () or default == []:
        return "—"
    if isinstance(default, bool) and getattr(param, "secondary_opts", None):
        return f"`{(param.opts if default else param.secondary_opts)[0]}`"
    return f"`{default}`"


def options_table(command: Any) -> list[str]:
    """One Markdown row per option of a click command: names, value, default, help."""
    rows = ["| option | value | default | meaning |", "|---|---|---|---|"]
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or getattr(param, "hidden", False):
            continue
        names = ", ".join(f"`{n}`" for n in (*param.opts, *getattr(param, "secondary_opts", ())))
        value = "" if getattr(param, "is_flag", False) else _cell(param.metavar or param.type.name.upper())
        rows.append(f"| {names} | {value} | {_default(param)} | {_cell(getattr(param, 'help', '') or '')} |")
    return rows


def config_table(cls: type) -> list[str]:
    """One Markdown row per field of a config dataclass: name, default."""
    rows = ["| field | default |", "|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "—"
        rows.append(f"| `{f.name}` | `{default!r}` |")
    return rows


def render_reference() -> str:
    """The whole of ``docs/options.md``."""
    from ttcompress.cli import COMMANDS, load_command
    from ttcompress.training.config import FinetuneConfig, TrainConfig

    lines = [_HEADER]
    for name in COMMANDS:
        command = load_command(name)
        lines += [f"## `ttcompress {name}`", "", _cell(command.help or "").split(". ")[0].rstrip(".") + ".", ""]
        lines += options_table(command) + [""]
    for cls in (TrainConfig, FinetuneConfig):
        lines += [f"## `{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}`", ""]
        lines += config_table(cls) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_reference()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
