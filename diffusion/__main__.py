"""``python -m diffusion``: the command line (`diffusion.cli`)."""

import sys

from .cli import main

sys.exit(main())
