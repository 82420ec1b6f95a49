"""`sail-convert` invocations run in one spawned process, one after the other (a process start-up costs
seconds; a conversion sets up its own process group, so it never runs in pytest's process).

Each result holds the exit code `main` returned (or SystemExit's), its stdout and its stderr, log records
included; an exception escaping `main` is recorded as Python would print it, with exit code 1.
"""

import io
import logging
import os
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from typing import Dict, List


def run_cli(cases: List[List[str]]) -> List[Dict]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    with warnings.catch_warnings():  # import-time notices (no apex / TE) would land in the first case
        warnings.simplefilter("ignore")
        import megatron.core  # noqa: F401

        from sail_megatron.convert import cli
    logging.getLogger().setLevel(logging.INFO)
    return [_run_one(cli.main, argv) for argv in cases]


def _run_one(main, argv: List[str]) -> Dict:
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # torch's CheckpointException is no Exception
                traceback.print_exc()
                rc = 1
    finally:
        root.removeHandler(handler)
    return {"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def error_lines(result: Dict) -> List[str]:
    """The lines of the error message `sail-convert` printed (from its `sail-convert CMD:` line on)."""
    lines = result["stderr"].splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("sail-convert ")]
    return lines[starts[-1] :] if starts else []
