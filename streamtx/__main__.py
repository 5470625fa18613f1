"""``python -m streamtx``: the ``streamtx`` command."""

import sys

from .apps.cli import main

sys.exit(main())
