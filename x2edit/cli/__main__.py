"""``python -m x2edit.cli ...``: the ``x2edit`` command (scripts that name the interpreter use it)."""

import sys

from x2edit.cli import main

sys.exit(main())
