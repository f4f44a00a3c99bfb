"""``python -m kvlab``: the command line."""

import sys

from kvlab.cli import main

sys.exit(main())
