"""A command-line tool run while a training "prunes" the checkpoint it reads, deterministically.

    python -m tests.helpers.pruning_run TIMES TOOL ARGS... [+ TIMES TOOL ARGS...]   (TOOL: sail-chat, sail-convert)

runs each tool's `main(ARGS)` in this process, one after the other, with megatron-core's checkpoint read
patched: each of the first TIMES model loads of that command first does what a training with
`run.keep_last 1` does at its next save (the newest checkpoint copied to the next iteration, renamed into
place, `latest` moved to it, the folder being read removed), then reads the folder it was asked for, which is
gone. No sleeps, no real trainer: the prune lands exactly between the reader's resolving of `latest` and its
read. After each command a line `pruning_run: exit N` goes to stderr; the process exits with the largest N.
"""

import os
import re
import shutil
import sys
from pathlib import Path

LATEST = "latest"


def prune_like_the_trainer(folder: Path) -> Path:
    """The save after `folder` in its run folder under keep_last 1; returns the new checkpoint folder."""
    run = folder.parent
    newest = max((p for p in run.iterdir() if re.fullmatch(r"iter_\d{8}", p.name)), key=lambda p: p.name)
    new = run / f"iter_{int(newest.name[5:]) + 1:08d}"
    shutil.copytree(newest, run / f"{new.name}.tmp")
    os.replace(run / f"{new.name}.tmp", new)
    (run / f"{LATEST}.tmp").write_text(new.name + "\n")
    os.replace(run / f"{LATEST}.tmp", run / LATEST)
    for old in run.iterdir():
        if re.fullmatch(r"iter_\d{8}", old.name) and old.name < new.name:
            shutil.rmtree(old)
    return new


_left = [0]  # prunes still to do in the running command


def _patch_model_reads() -> None:
    from sail_megatron.training import backend_state

    real = backend_state.load_sharded

    def load_sharded(sharded_state, directory):
        if _left[0] > 0 and (Path(directory).parent / LATEST).is_file():
            _left[0] -= 1
            prune_like_the_trainer(Path(directory))
        return real(sharded_state, directory)

    backend_state.load_sharded = load_sharded


def _tool_main(tool: str):
    if tool == "sail-chat":
        from sail_megatron.chat.cli import main
    elif tool == "sail-convert":
        from sail_megatron.convert.cli import main
    else:
        raise SystemExit(f"unknown tool {tool}")
    return main


def main(argv) -> int:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    _patch_model_reads()
    commands, current = [], []
    for word in argv:
        if word == "+":
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    worst = 0
    for times, tool, *args in commands:
        _left[0] = int(times)
        code = _tool_main(tool)(args)
        print(f"pruning_run: exit {code}", file=sys.stderr, flush=True)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
