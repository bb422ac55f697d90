"""``ttcompress demo``: the whole loop on the embedded data, offline (:func:`ttcompress.demo.run_demo`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ttcompress.cli._app import command_app
from ttcompress.cli._common import cli_errors, err, out
from ttcompress.cli.threads import requested_threads

app = command_app()


@app.command("demo")
@cli_errors
def demo_command(
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory for the baseline, the sweep, report.md and tradeoff.png.",
        metavar="DIR")] = Path("demo-output"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="The same curve, reduced (a few batches per epoch, data-free, no timing) for smoke tests.")] = False,
) -> None:
    """Train seed-cnn on mnist-5k; compress it 4× to 48× (TT + CP, calibrated), fine-tune with distillation; report.

    Writes DIR/report.md, DIR/report.json and DIR/tradeoff.png. Offline and seeded.
    """
    from ttcompress.cli.progress import RichProgress
    from ttcompress.demo import DemoSettings, run_demo
    from ttcompress.report.render import to_rich_tables

    settings = DemoSettings.quick() if quick else DemoSettings()
    if requested_threads() is not None:  # --threads replaces the demo's one thread
        settings = dataclasses.replace(settings, threads=requested_threads())
    progress = RichProgress(err)
    try:
        result = run_demo(output, settings=settings, console=err, progress=progress)
    finally:
        progress.close()
    for table in to_rich_tables(result.report):
        out.print(table)
    err.print(f"wrote {result.report_md}, {result.report_json} and {result.plot}")
