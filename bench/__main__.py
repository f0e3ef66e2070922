"""Entry point of `python -m bench`: runs the suite and writes bench/results/latest.json.

All the logic lives in `bench.run`; this only hands it the command line.
"""

from __future__ import annotations

import sys

from bench.run import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
