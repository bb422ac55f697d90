"""`ttcompress finetune` (work in progress)."""

from ttcompress.cli import app  # noqa: F401
