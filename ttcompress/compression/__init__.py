"""Running a compression: plans and plan files, rank allocation, the surgery pipeline and its checks,
the dry run, and scale-out over processes."""
