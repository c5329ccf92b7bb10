"""`gdlab-report`: compare the runs of an experiment, or the child runs of a sweep, from MLflow alone.

One concept in five modules, imported one way: `runs` (what is read from MLflow) -> `tables` (labels, the
objective, the two tables) -> `figures` (the PNGs) -> `pbt` (a PBT sweep's lineage) -> `build` (the report
and the command). In a notebook: ``from gdlab.report import build_report``.
"""

__all__ = ["Report", "ReportError", "TrackedRun", "build_report", "main"]


def __getattr__(name: str):
    # Lazy, so a caller that needs only `gdlab.report.runs` does not import the figures.
    if name in ("Report", "build_report", "main"):
        from gdlab.report import build

        return getattr(build, name)
    if name in ("ReportError", "TrackedRun"):
        from gdlab.report import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'gdlab.report' has no attribute {name!r}")
