"""Times as the grids, caches, CSV files and store keys write them.

A time is in its backbone's own convention (a DDPM index, a masked step, a flow time in [0, 1]); the one
canonical form, an int when the value is whole and a float otherwise, lets ``100``, ``100.0`` and ``"100"`` (a CSV
cell) name the same cell, and keeps a flow time ``0.25`` from being cut to ``0`` by an ``int()``.
"""

from __future__ import annotations

import numbers


def as_time(value: object) -> int | float:
    """``value`` (a number or its text) as an int when whole, else a float; a ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise ValueError(f"{value!r} is not a time")
    number = float(value)
    return int(number) if number.is_integer() else number
