"""``python -m minisparse`` is the ``minisparse`` command."""
import sys

from .cli import main

sys.exit(main())
