#!/usr/bin/env python
"""Data benchmark: decode + tile + normalize per CPU core, DALI vs PIL vs an InternVL-style baseline."""

from sail_megatron.data.bench import main

if __name__ == "__main__":
    main()
