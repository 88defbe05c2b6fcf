"""``python -m tokenlean ...``: the command line (also what ``accelerate launch -m tokenlean eval`` runs)."""

import sys

from tokenlean.cli import main

sys.exit(main())
