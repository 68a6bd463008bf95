"""Neural Cleanse's outlier test: the anomaly index of each label's reversed-trigger size.

A backdoor target needs a much smaller trigger than the other labels. With the mask L1 norms
``l1`` of the labels, the median ``med`` and the median absolute deviation ``MAD = median(|l1 -
med|)`` scaled by the consistency constant 1.4826 (so it estimates the standard deviation of
normal data), the anomaly index of a label is

    index = (med - l1) / (1.4826 * MAD).

Only labels *below* the median can be backdoor targets, so the index is signed: labels above the
median get a negative index (its value is kept, for reports) and are never flagged. A label is
flagged when its index exceeds the threshold (2 in the paper, i.e. > 95 % confidence of being an
outlier under a normal model).

The index has a ceiling: a label cannot need less than an empty mask (L1 0), so no index can exceed
``med / (1.4826 * MAD)`` (:func:`index_ceiling`). With few labels whose trigger sizes vary widely (a
10-class model where some digits are much easier targets than others) the ceiling can fall below
the threshold; then the test cannot flag any label, however small its trigger, and "nothing
flagged" means "inconclusive", not "clean".
"""

from __future__ import annotations

import numpy as np

from .errors import NetcleanseError

MAD_CONSISTENCY = 1.4826


def median_and_mad(values) -> tuple[float, float]:
    """Median and consistency-scaled MAD (1.4826 * median |v - median|) of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise NetcleanseError("anomaly index needs at least one label")
    med = float(np.median(v))
    return med, MAD_CONSISTENCY * float(np.median(np.abs(v - med)))


def anomaly_indices(l1, reference=None) -> np.ndarray:
    """Signed anomaly index of each value in ``l1``.

    ``reference``: the values that define "normal" (median and MAD); by default ``l1`` itself, as
    in the paper. The fast scan passes a random sample of labels searched with the same budget
    (see :mod:`netcleanse.scanning`). When the MAD is 0 (no spread at all) no value can be called an
    outlier and every index is 0.
    """
    l1 = np.asarray(l1, dtype=np.float64)
    med, mad = median_and_mad(l1 if reference is None else reference)
    if mad == 0:
        return np.zeros_like(l1)
    return (med - l1) / mad


def index_ceiling(reference, includes_labels: bool = False) -> float:
    """The largest anomaly index any label can get against ``reference``: that of an empty mask
    (L1 0), ``median / (1.4826 * MAD)``; 0 when the MAD is 0 (every index is then 0).

    ``includes_labels``: the reference is the labels themselves (the paper's scheme), so a label
    whose mask shrank to nothing would move the median and MAD too: the ceiling is then the largest,
    over the labels, of the index of an empty mask in its place (with two labels every index is
    +-0.6745 whatever the masks, so none can ever pass 2)."""
    v = np.asarray(reference, dtype=np.float64)
    if not includes_labels:
        med, mad = median_and_mad(v)
        return med / mad if mad > 0 else 0.0
    best = 0.0
    for i in range(v.size):
        med, mad = median_and_mad(np.concatenate([v[:i], [0.0], v[i + 1:]]))
        if mad > 0:
            best = max(best, med / mad)
    return best


def flag_labels(labels, indices, threshold: float = 2.0) -> list[int]:
    """Labels whose anomaly index is above ``threshold`` (only labels below the median can be)."""
    if threshold <= 0:
        raise NetcleanseError(f"threshold must be positive, got {threshold}")
    return [int(t) for t, a in zip(labels, indices) if a > threshold]
