"""The cell-level coordinator policy (`cell`): one joint allocation per frame over every camera of
every vehicle in the cell, under the cell's capacity; each vehicle then sends what it was given.

This is the hook for `optimizer/cell.py` (the joint cell-level allocator, with weights per
vehicle and camera, fairness variants and the GPU pool as a second constraint), which is being
written alongside the fleet. Until that module exists the policy is refused with one line
(`check_cell_policy`); `cell_allocator_available()` says whether it is there.
"""

from __future__ import annotations

import importlib.util

from avcloud.errors import UserError

CELL_POLICY = "cell"


def cell_allocator_available() -> bool:
    try:
        return importlib.util.find_spec("optimizer.cell") is not None
    except (ImportError, ValueError):
        return False


def check_cell_policy() -> None:
    if not cell_allocator_available():
        raise UserError(f"policy '{CELL_POLICY}' needs the cell-level allocator (optimizer/cell.py), "
                        "which this installation lacks; choose turbo, turbo-q, equal, naive or onboard")
