"""``python -m evf.cli`` = the ``evf`` command."""

import sys

from evf.cli import main

sys.exit(main())
