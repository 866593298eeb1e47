"""``python -m service.cli``: the ``hmaopt`` command (tests and local worker processes start
it this way)."""

import sys

from service.cli import main

sys.exit(main())
