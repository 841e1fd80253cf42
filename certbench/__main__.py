"""``python -m certbench``: the same as the ``certbench`` command."""

import sys

from certbench.cli import main

sys.exit(main())
