"""``python -m tkernels.cli``: the console script without its installed launcher."""

import sys

from tkernels.cli import main

sys.exit(main())
