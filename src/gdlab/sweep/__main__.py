"""`python -m gdlab.sweep`: the same app as gdlab-sweep (how --workers starts its worker processes)."""

import sys

from gdlab.sweep.cli import main

sys.exit(main())
