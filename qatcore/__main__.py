"""``python -m qatcore`` is the ``qatcore`` command."""

import sys

from qatcore.cli import main

sys.exit(main())
