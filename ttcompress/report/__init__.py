"""Reports: the side-by-side comparison (``compare``), what is measured on one model (``measure``,
``evaluation``), and its rendering (``render``: table, Markdown, CSV, JSON; ``plot``: the trade-off plot)."""
