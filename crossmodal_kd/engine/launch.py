"""Catch an ``accelerate launch`` that asked for several processes but started one.

Accelerate's simple launcher (``--cpu``, or no ``--multi_gpu``) exports ``MASTER_ADDR`` whenever more
than one process or machine is requested, yet starts a single process unless ``mpirun`` is set up
(``accelerate/utils/launch.py``, ``prepare_simple_launcher_cmd_env``); torchrun and mpirun export the
world size. The requested count is read from the launcher's command line when it is the parent.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def requested_processes(launcher_argv: Sequence[str]) -> int | None:
    """``--num_processes N`` (or ``=N``) of an ``accelerate launch`` command line; None if absent."""
    for i, arg in enumerate(launcher_argv):
        value = arg.partition("=")[2] if arg.startswith("--num_processes=") else None
        if arg == "--num_processes" and i + 1 < len(launcher_argv):
            value = launcher_argv[i + 1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def _parent_argv() -> list[str]:
    import psutil  # a dependency of accelerate

    try:
        return psutil.Process(os.getppid()).cmdline()
    except psutil.Error:
        return []


def launch_mismatch(world_size: int, env: Mapping[str, str] | None = None, launcher_argv: Sequence[str] | None = None) -> str | None:
    """One warning line when ``accelerate launch`` requested more processes than ``world_size``, else None.
    ``env`` defaults to ``os.environ``, ``launcher_argv`` to the parent process's command line."""
    env = os.environ if env is None else env
    launched = "MASTER_ADDR" in env and "ACCELERATE_MIXED_PRECISION" in env  # both set by the simple launcher
    if world_size != 1 or not launched or any(k in env for k in WORLD_SIZE_VARS):
        return None
    requested = requested_processes(_parent_argv() if launcher_argv is None else launcher_argv)
    if requested == world_size:
        return None
    n = requested or 2
    return (
        f"accelerate launch asked for {requested or 'several'} processes but started {world_size} "
        f"(Accelerate's multi-CPU path needs MPI); to start {n} CPU processes run "
        f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} ...` (README, Launch recipes)"
    )


@functools.cache
def _warn(message: str) -> None:
    log.warning(message)


def warn_launch_mismatch(world_size: int) -> None:
    """Log :func:`launch_mismatch`'s line, once per process."""
    if (message := launch_mismatch(world_size)) is not None:
        _warn(message)
