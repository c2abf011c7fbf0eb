"""The offline CLI's entry point: ``python -m service.predict`` (and ``classify-images``).

    python -m service.predict photos/ cat.jpg --format csv --output labels.csv
    python -m service.predict merge FOLDER

The CLI itself is :mod:`service.cli`.
"""

from __future__ import annotations

import sys

from service.cli.classify import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
