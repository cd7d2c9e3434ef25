"""``python -m havend``."""

import sys

from havend.cli import main

sys.exit(main())
