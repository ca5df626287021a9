#!/usr/bin/env python3
"""Entry point: `python exporter.py --config config.yaml` (or `--demo`)."""

import sys

from exlogare_exporter.cli import main

if __name__ == "__main__":
    sys.exit(main())
