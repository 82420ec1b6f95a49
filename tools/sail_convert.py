#!/usr/bin/env python
"""Thin entry point: `python tools/sail_convert.py ...` is `sail-convert ...`."""

import sys

from sail_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
