"""How many actors each model pool gets when the config says ``actors: auto``, and how many blocks
the cases are read in.

The pools share what Ray reports: a pool that asks for GPUs gets as many actors as its share of
the GPUs holds; a CPU pool as many as its share of the CPUs left after one read/write task; a pool
that asks for custom resources no more than the cluster's total of them holds. Every pool gets at
least one actor; an explicit number in the config always wins.
"""

from __future__ import annotations

import math

from ..config import ActorPoolConfig, PipelineConfig


def _auto_size(pool: ActorPoolConfig, cpus: float, gpus: float, n_pools: int, totals: dict[str, float]) -> int:
    fits = math.floor(cpus / n_pools / pool.num_cpus + 1e-9)
    if pool.num_gpus > 0:
        fits = min(fits, math.floor(gpus / n_pools / pool.num_gpus + 1e-9))
    for name, amount in pool.resources.items():  # no more actors than the nodes offering them hold
        fits = min(fits, math.floor(totals.get(name, 0.0) / amount + 1e-9))
    return max(1, fits)


def pool_sizes(pipeline: PipelineConfig, text_mode: bool, cpus: float, gpus: float = 0.0,
               totals: dict[str, float] | None = None) -> dict[str, int]:
    """Actors per pool (``saliency`` only in text mode, ``sam`` always) for a cluster of ``cpus`` and
    ``gpus``, and ``totals`` of its custom resources."""
    pools = {"saliency": pipeline.saliency, "sam": pipeline.sam} if text_mode else {"sam": pipeline.sam}
    automatic = [name for name, pool in pools.items() if pool.actors == "auto"]
    budget = max(cpus - pipeline.task_cpus, 0.0)
    for pool in pools.values():  # explicit pools take their share first
        if pool.actors != "auto":
            budget -= pool.actors * pool.num_cpus
            gpus -= pool.actors * pool.num_gpus
    sizes = {name: pool.actors for name, pool in pools.items() if pool.actors != "auto"}
    for name in automatic:
        sizes[name] = _auto_size(pools[name], max(budget, 0.0), max(gpus, 0.0), len(automatic), totals or {})
    return sizes


CASES_PER_BLOCK = 8  # cases read into one Ray Data block, where the cluster is busy enough
MAX_BLOCKS = 1000


def read_blocks(n_cases: int, cpus: float) -> int:
    """Blocks the planned cases are read in: a few cases each, at least two blocks per CPU.

    Every block is a read task, an actor call and a write task, each costing Ray Data some 10 ms of
    the driver's CPU and more in the workers, whatever it carries: one 2D case per block made that
    the run's largest cost (``benchmarks/overhead.py``). Eight cases keep a block's wait behind
    SAM short, and two blocks per CPU keep every CPU of a large cluster reading."""
    wanted = max(math.ceil(n_cases / CASES_PER_BLOCK), 2 * math.ceil(cpus))
    return max(1, min(n_cases, MAX_BLOCKS, wanted))
