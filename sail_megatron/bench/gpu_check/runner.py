"""Running parts: each in its own subprocess under a timeout, all of them within one time budget. A part that
fails, crashes or runs out of time is recorded (status, figures so far, the tail of its log) and the next one
starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

TE_REQUIREMENT = "transformer-engine[pytorch]>=2.9,<2.12"  # what megatron-core 0.16 supports
TE_MISSING = (
    "Transformer Engine is not importable ({error}); `make gpu-check INSTALL_TE=1` installs it "
    f"(pip install --no-build-isolation '{TE_REQUIREMENT}')"
)
MIN_START_S = 30  # a part is not started with less budget than this left
LOG_TAIL_LINES = 40
STATUSES = ("passed", "failed", "timeout", "skipped")


@dataclass
class Context:
    root: Path
    """The repository: commands run here."""
    out: Path
    """Where the report goes; logs/ and work/ below it."""
    python: str = sys.executable
    env: Dict[str, Any] = field(default_factory=dict)
    """What the environment probe found (versions, device, bandwidth)."""
    tokenizer: Optional[Path] = None

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def work(self) -> Path:
        return self.out / "work"

    def figures_path(self, name: str) -> Path:
        return self.work / f"{name}.json"


@dataclass
class Part:
    name: str
    title: str
    timeout_s: float
    command: Callable[[Context], List[str]]
    collect: Optional[Callable[[Context, str], Tuple[Dict[str, Any], str]]] = None
    """(figures, one-line summary) from the part's outputs and log text; runs whatever the status."""
    needs_te: bool = False
    extra_env: Dict[str, str] = field(default_factory=dict)
    in_default_run: bool = True
    """False: runs only when named with --only (a part the CPU CI covers, kept for a GPU machine's launcher)."""


@dataclass
class PartResult:
    name: str
    title: str
    status: str
    """passed | failed | timeout | skipped"""
    seconds: float = 0.0
    command: str = ""
    returncode: Optional[int] = None
    summary: str = ""
    reason: str = ""
    """Why it was skipped, or what failed when the log alone does not say."""
    figures: Dict[str, Any] = field(default_factory=dict)
    log: str = ""
    log_tail: str = ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def descendants(pid: int) -> List[int]:
    """pid's children, grandchildren, ... from /proc (Linux). torchrun starts each rank in its own session,
    so killing a part's process group alone would leave its ranks running."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def kill_part(pid: int) -> None:
    """SIGKILL a part's process, its process group and every descendant (listed first: once the parents are
    dead their children are re-parented and no longer found)."""
    stragglers = descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in stragglers:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_part(part: Part, ctx: Context, timeout_s: float) -> PartResult:
    """One part in its own process group; killed with all its processes at the timeout."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    log_path = ctx.logs / f"{part.name}.log"
    try:
        argv = part.command(ctx)
    except Exception as e:  # a part that cannot even say what to run (missing input)
        return PartResult(part.name, part.title, "failed", reason=f"{type(e).__name__}: {e}")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        **part.extra_env,
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # a worker is a world of its own
        env.pop(var, None)
    result = PartResult(part.name, part.title, "failed", command=" ".join(argv), log=str(log_path))
    began = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {result.command}\n")
        log.flush()
        proc = subprocess.Popen(
            argv, cwd=ctx.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            result.returncode = proc.wait(timeout=timeout_s)
            result.status = "passed" if result.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_part(proc.pid)
            proc.wait()
            result.status = "timeout"
            result.reason = f"killed after {timeout_s:.0f} s"
    result.seconds = time.monotonic() - began
    text = log_path.read_text(errors="replace")
    result.log_tail = tail(text)
    if part.collect is not None:
        try:
            result.figures, result.summary = part.collect(ctx, text)
        except Exception as e:
            if result.status == "passed":
                result.status = "failed"
            result.reason = result.reason or f"could not read the part's results: {type(e).__name__}: {e}"
    return result


def _te_missing(ctx: Context) -> str:
    error = ctx.env.get(
        "transformer_engine_error", "the environment probe failed" if "probe_error" in ctx.env else "not installed"
    )
    return TE_MISSING.format(error=error)


def run_parts(
    parts: Sequence[Part], ctx: Context, budget_s: float, on_done: Optional[Callable[[PartResult], None]] = None
) -> List[PartResult]:
    """Every part in order, whatever happened to the previous ones, within one time budget."""
    deadline = time.monotonic() + budget_s
    te_ok = bool(ctx.env.get("transformer_engine"))
    results = []
    for part in parts:
        left = deadline - time.monotonic()
        if part.needs_te and not te_ok:
            result = PartResult(part.name, part.title, "skipped", reason=_te_missing(ctx))
        elif left < MIN_START_S:
            result = PartResult(
                part.name, part.title, "skipped", reason=f"not started: {max(left, 0):.0f} s of the time budget left"
            )
        else:
            result = run_part(part, ctx, min(part.timeout_s, left))
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results
