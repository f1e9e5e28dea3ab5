"""Limits and budgets a deployment sets through the environment (``MEDCLIPSAM_*``).

Read at every call, not at import: on a cluster the environment of the worker that does the work
decides, and a test can change it.
"""

from __future__ import annotations

import math
import os

from ..errors import InputError


def number_from_env(name: str, default: float, minimum: float, unit: str) -> float:
    """``$name`` as a number of at least ``minimum`` (``default`` when unset or blank); anything else
    is an InputError naming the variable, the unit and the value found."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise InputError(f"{name} must be a number of {unit} of at least {minimum:g}, got {raw!r}")
    return value
