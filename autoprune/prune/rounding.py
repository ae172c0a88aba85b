"""One rounding rule for channel counts, shared by plans, sensitivity scans and budgets.

Example:
    >>> import numpy as np
    >>> round_counts(np.array([3.0, 13.0]), step=np.array([8.0, 8.0]), unit=np.array([1.0, 1.0]),
    ...              channels=np.array([16.0, 16.0])).tolist()
    [3.0, 16.0]
"""

from __future__ import annotations

import numpy as np


def round_counts(counts: np.ndarray, step: np.ndarray, unit: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """Round channel counts to multiples of ``step``, or, below one step, up to whole blocks.

    Rounding must never make a budget unreachable: a 16-channel group with
    ``round_to`` 8 could otherwise not keep fewer than 8 channels, where uniform
    pruning keeps 2. Below one step a group moves in its blocks (``Group.unit``),
    rounded up so it stays within its ratio bound.
    """
    coarse = np.round(counts / step) * step
    fine = np.ceil(np.maximum(counts, 1e-9) / unit - 1e-9) * unit
    return np.clip(np.where(counts >= step, coarse, fine), unit, channels)


def next_count(kept: float, step: float, unit: float) -> float:
    """The next channel count above ``kept`` that :func:`round_counts` can give."""
    return kept + unit if kept < step else kept + step
