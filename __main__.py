"""`python -m tunekit ...`: the headless command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
