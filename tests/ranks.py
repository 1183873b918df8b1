"""Run a function on gloo ranks spawned on this machine and collect what each returns."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(function: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """``function(*args)`` on each of ``world_size`` ranks, one process each; their results.

    ``function`` must be importable by name (a module-level function of a test module).
    """
    results = mp.Manager().dict()
    mp.start_processes(
        _rank_main,
        args=(world_size, _free_port(), results, function, args),
        nprocs=world_size,
        start_method="spawn",
    )
    return [results[rank] for rank in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, results, function, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the machine's cores
    # A rank stuck in a collective fails the test in a minute instead of hanging it.
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        results[rank] = function(*args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
