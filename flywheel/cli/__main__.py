"""`python -m flywheel.cli`: the `flywheel` command."""

import sys

from . import main

sys.exit(main())
