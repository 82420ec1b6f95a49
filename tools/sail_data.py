#!/usr/bin/env python
"""Thin entry point: `python tools/sail_data.py ...` is `sail-data ...`."""

import sys

from sail_megatron.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
