"""`python -m service.cli`: the `burrow` command."""

import sys

from service.cli import main

sys.exit(main())
