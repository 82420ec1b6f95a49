"""`python -m sail_megatron.bench.gpu_check [--only PART ...]`: the check (as tools/gpu_check.py);
`python -m sail_megatron.bench.gpu_check worker NAME OUT.json --root ROOT`: one worker, inside a part's
subprocess. The guard matters: checkpoint writers start processes that re-import this module."""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        from sail_megatron.bench.gpu_check.worker import worker_main

        sys.exit(worker_main(sys.argv[2:]))
    from sail_megatron.bench.gpu_check.cli import main

    sys.exit(main(sys.argv[1:]))
