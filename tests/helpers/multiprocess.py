"""Run a function on N processes: gloo on loopback on the CPU, NCCL on GPUs (one per rank).

The function must be importable (module level) because ranks are spawned. Ranks are not daemonic:
dist_checkpointing starts a multiprocessing Manager, which daemonic processes may not do. Each rank's return value
comes back through torch.save bytes; a failure on any rank raises with that rank's traceback.
"""

import io
import os
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, results, args, kwargs):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        value = fn(*args, **kwargs)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including SystemExit from a worker
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 600, **kwargs) -> List[Any]:
    """fn(*args, **kwargs) on `world_size` fresh processes; returns their results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, results, args, kwargs)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs, failures = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no result within {timeout}s") from None
            if ok:
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks are likely stuck in a collective now
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(failures))
    return [outputs[r] for r in range(world_size)]
