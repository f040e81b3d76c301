"""``python -m detector.cli``: the ``phasewatch`` command line."""

import sys

from detector.cli import main

sys.exit(main())
