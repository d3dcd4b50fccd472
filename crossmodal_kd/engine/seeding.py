"""Per-stage seeds."""

from __future__ import annotations

import zlib


def stage_seed(seed: int, stage: str) -> int:
    """Seed of one stage: depends on the run seed and the stage's name only, so a stage trains the same
    way in every config that contains it (a shared teacher in ``demo`` and ``compare``, say)."""
    return seed * 1_000_003 + zlib.crc32(stage.encode()) % 1_000_003
