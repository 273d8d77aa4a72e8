"""``python -m retrbench ...`` is the ``retrbench`` command."""

import sys

from .cli import main

sys.exit(main())
