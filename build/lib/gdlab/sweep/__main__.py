"""`python -m gdlab.sweep`: the same app as gdlab-sweep (how --workers starts its worker processes)."""

from gdlab.entry import sweep

sweep()
