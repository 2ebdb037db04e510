"""``python -m optimizely_odp_ext``: see :mod:`optimizely_odp_ext.cli`."""

import sys

from .cli import main

sys.exit(main())
