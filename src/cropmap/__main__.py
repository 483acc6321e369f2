"""``python -m cropmap``."""

import sys

from cropmap.cli import main

sys.exit(main())
