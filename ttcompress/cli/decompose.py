"""`ttcompress decompose` (work in progress)."""

from ttcompress.cli import app  # noqa: F401
