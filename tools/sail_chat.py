#!/usr/bin/env python
"""Thin entry point: `python tools/sail_chat.py ...` is `sail-chat ...`."""

import sys

from sail_megatron.chat.cli import main

if __name__ == "__main__":
    sys.exit(main())
