"""A model-level backdoor test with a stated false-alarm rate (the default verdict of a scan).

Neural Cleanse's rule (:mod:`netcleanse.detection`) flags a label whose anomaly index exceeds 2.
That is a *per-label* 5 % level: a model without a backdoor but with K labels gets at least one
flag far more often than 5 % (about 1 - 0.977^K under a normal model, and more with few labels,
whose median and MAD are themselves noisy). This module tests the *model*.

**Statistic.** Label t's reversed trigger has mask L1 ``l1_t``; its log size is
``x_t = log(max(l1_t, FLOOR))`` (trigger sizes of a model's clean labels are skewed: a few easy
labels need much smaller masks; on the log scale their spread is roughly symmetric). Against a
set of reference labels with median ``m`` and robust scale ``s`` of their log sizes, the label's
index is the paper's anomaly index on the log scale,

    z_t = (m - x_t) / s .

The scale ``s`` is Rousseeuw and Croux's Qn (``scale="qn"``, the default: 2.2219 times the k-th
smallest of the pairwise distances |x_i - x_j|, k = C(h, 2), h = n // 2 + 1), as robust as the MAD
(half the labels may be outliers) but about twice as efficient on normal data, which matters when
the reference is 48 control labels; for references above ``QN_MAX`` labels (where the MAD's own
noise is small and Qn's pairs are many) it is the MAD, as in the paper (``scale="mad"`` always).
``s`` is never taken below ``min_scale`` (``SCALE_FLOOR`` = 0.2 on the log scale): labels of a
real model differ in difficulty by more than that (on the development half of the benchmark zoo,
95 % of the clean 10-label scans had a spread above 0.22), and a tight cluster of clean labels
would otherwise make a clean label at 70 % of the median look extreme. A floor only lowers
indices, so it never raises the false-alarm rate above ``alpha``; it costs power only on models
whose clean labels really are that alike.

The model's statistic is the largest index, ``T = max_t z_t`` over its K labels.

**Null.** A model without a backdoor is taken to have log sizes that are independent draws from
one location-scale family: Student-t with ``df`` = 10 degrees of freedom by default (``FAMILY``,
``DF``), or normal. Real models have a few naturally easy labels, a heavier lower tail than the
normal's: on the development half of the benchmark zoo a normal null flagged 3-5 of 30 clean
models per group (10 and 100 labels), t(10) none of the 120 clean scans, while detecting as
many backdoors but one or two (benchmarks/RESULTS.md). With many labels that tail costs power: the
largest of 1283 t(10) draws is far out (the critical index of the combined index with 48 controls
is 7.17), while the clean 1000-label models of a lab zoo (``mnist-triples``) had model-level p-values
of 0.58-1.0 under t(10): a scan of many labels refines only its candidates and controls (64-112
labels), and the largest of all K labels' t(10) draws overstates what a clean model shows. So the
family depends on the number of labels (:func:`null_family`): t(10) up to ``FEW_LABELS`` = 100
labels, from ``MANY_LABELS`` = 1000 on t(``DF_MANY`` = 20), the lightest tail under which no clean
model of that zoo's development half was flagged, by the combined index or by the size alone
(normal and t(40) flagged some on size alone; critical index of the combined index for 1283 labels
and 48 controls: 5.82), and between them the t whose 1 / df is linear in log K (an interpolation no
zoo measured). ``T`` is invariant to location and scale, so its null distribution depends only on
K, on how the reference is chosen (all K labels, as in the paper, or a random sample of ``n_ref``
labels, as the fast preset's controls) and on the family, not on the model. It is simulated
(:func:`null_max_index`, fixed seed, cached), which also accounts for the noise of the median and
scale themselves, so the test holds its level with 10 labels as with 1283 (under its null).

**p-values.** Label t's p-value is ``P(T_K >= z_t)`` under the null: corrected for the K labels
tested (a single-step max-T adjustment). The model's p-value is the p-value of its most anomalous
label. A model is flagged when that is <= ``alpha``: under the null model the probability of
flagging a model without a backdoor is then <= ``alpha``, whatever K.

**Several targets (step-down).** After the most anomalous label is flagged, it is removed, the
reference is refitted without it, and the next most anomalous label is tested against the null of
the remaining K - 1 labels; this repeats until a label's p-value exceeds ``alpha`` (each step's
p-value is made no smaller than the previous step's, as in Holm's procedure).

**Transferable labels (data-free scans of models with few labels).** With 10 labels, two or three
planted targets sit in the reference that defines a normal size and hide each other: the fit's
median and scale move towards them, and the t null of 10 labels needs an index the second and third
target no longer reach. A second property tells targets from easy labels without looking at sizes:
a planted trigger is universal, so per-input triggers towards a target transfer to other inputs
(:mod:`netcleanse.transferability`). When ``transfer`` is given (all labels in the reference),
the labels whose expected transferability is at least ``transfer_threshold`` (the set E) are tested
first, against a reference of the other labels alone: label t in E gets the index of its size (and
margin) against the median and scale of the labels outside E. The first step tests E as a whole
(``transfer_ordered``, :func:`ordered_selected_pvalue`): with E's indices sorted, z_(1) >= ... >=
z_(|E|), each order j has its p-value ``p_j = P(Z_(j) >= z_(j))`` under the null of |E| selected
labels against K - |E| others (all draws of the family), and the statistic is ``P* = min_j p_j``,
itself calibrated on the same simulated models; when its p-value is <= alpha, the j* most anomalous
labels of E are flagged (j* the order that reached the minimum). Two or three planted targets of
similar size are thus judged together: one by one, each is only as extreme as the largest of |E|
labels must be, which the null of a few selected labels against 7 others puts far out. A single
transferable label is tested as before. A step-down then runs over the rest of E with the null
:func:`null_selected_index` (the largest index of the labels left in E; each step's null has one
label fewer) and goes on over the labels outside E as above, refitted without the labels already
flagged. When E is not empty (and at least 3 labels are outside it) the test is two tests, so every
p-value of both stages is doubled (Bonferroni) and the model's p-value is the smaller of the two
stages' first.

Which clean labels transfer is not independent of their sizes: an easy label's per-input triggers
transfer a little more (rank correlation between a clean label's transferability and its size
anomaly: 0.20 on average over the 30 clean 10-label MNIST development models, 0.53 over 20 clean
nets of scikit-learn's digits, where the most transferable label was the easiest in 18 of 20). The
null therefore picks E as the labels of largest score ``TRANSFER_RHO * g + sqrt(1 - TRANSFER_RHO^2)
* e`` (``g`` a label's size anomaly, ``e`` noise; ``transfer_dependence``): 0 would be a choice
blind to size, 1 the easiest labels. With ``TRANSFER_RHO`` = 0.7 a model without a backdoor is
flagged with probability at most ``alpha`` when its transferable labels follow ease up to that
correlation, and about 6 % at alpha 0.05 (simulated, 8-21 labels: 5.6-6.1 %) when they are exactly
its easiest labels (a null blind to size: 13-31 %). Chosen on the development half with the ordered
first step, as the allowance whose simulated worst case stays at or below the one-by-one test's at
0.5 (6.4-7.2 %): 0.5 would have detected one development model more, but reached 8.5-10.9 % in that
worst case; 0.6, 8.1 % at 21 labels (``benchmarks/mad_null.py --margins --transfer``,
``benchmarks/RESULTS.md``).

**Inconclusive.** When even an empty mask (``x = log FLOOR``) would not reach ``alpha`` (very few
labels, or no spread at all among the reference labels), the test has no power and says so.

p-values come from ``draws`` simulated models: the smallest one reported is ``1 / (draws + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
import math
import zlib

import numpy as np

from .errors import NetcleanseError

# mask L1 (in pixels) below which trigger sizes are not told apart: half a pixel
FLOOR = 0.5
DRAWS = 20000
FAMILIES = ("normal", "t")
# the null family of the labels' log sizes: Student-t with 10 degrees of freedom, chosen on the
# development half of the benchmark zoo (a normal null flagged 3-5 of 30 clean models per group there)
FAMILY, DF = "t", 10.0
# ... for models of up to FEW_LABELS labels; from MANY_LABELS labels on the null is t(DF_MANY)
# (inf: normal), chosen on the development half of a 1000-label zoo; between the two 1 / df is
# linear in log K (:func:`null_family`)
FEW_LABELS, MANY_LABELS = 100, 1000
DF_MANY = 20.0
SCALES = ("qn", "mad")
QN_MAX = 128  # larger references use the MAD
# the smallest scale the reference's log sizes are given (chosen on the development half of the
# benchmark zoo; see the module doc)
SCALE_FLOOR = 0.2
# the second signal (log maximum margin, :mod:`netcleanse.margin`): margins below this are not
# told apart, and the reference's log margins are given at least this scale
MARGIN_FLOOR = 1e-3
MARGIN_SCALE_FLOOR = 0.1
# among a clean model's labels the two signals are not independent: an easy label needs a small mask
# and also reaches a large margin (log size vs log margin, median correlation -0.45 on the 10-label
# and -0.56 on the 100-label clean models of the development half); the null draws both anomaly
# directions with this correlation
MARGIN_RHO = 0.5
# how strongly a clean label's transferability may follow its ease (the correlation between the
# transferable labels' selection score and the size's anomaly that the transferable stage's null
# allows; module doc, "Transferable labels")
TRANSFER_RHO = 0.7
# the transferable stage's first step tests its labels together by their ordered indices (False: the
# most anomalous alone, the test until 2026-12-04, with TRANSFER_RHO 0.5)
TRANSFER_ORDERED = True


def robust_scale(x: np.ndarray, scale: str = "qn") -> np.ndarray:
    """Robust scale of the last axis of ``x``: Qn (n <= QN_MAX, ``scale="qn"``) or the
    consistency-scaled MAD; 0 for fewer than two values."""
    if scale not in SCALES:
        raise NetcleanseError(f"unknown scale estimator {scale!r}; use one of {', '.join(SCALES)}")
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    if n < 2:
        return np.zeros(x.shape[:-1])
    if scale == "mad" or n > QN_MAX:
        return 1.4826 * np.median(np.abs(x - np.median(x, axis=-1, keepdims=True)), axis=-1)
    i, j = np.triu_indices(n, 1)
    h = n // 2 + 1
    k = h * (h - 1) // 2
    return 2.2219 * np.partition(np.abs(x[..., i] - x[..., j]), k - 1, axis=-1)[..., k - 1]


def log_size(l1) -> np.ndarray:
    """``log(max(l1, FLOOR))``: the scale on which labels' trigger sizes are compared."""
    return np.log(np.maximum(np.asarray(l1, dtype=np.float64), FLOOR))


def null_family(n_labels: int) -> tuple[str, float]:
    """The default null ``(family, df)`` of a model with ``n_labels`` labels: t(``DF``) up to
    ``FEW_LABELS`` labels, t(``DF_MANY``) from ``MANY_LABELS`` on (normal where ``DF_MANY`` is inf),
    and between them the t whose 1 / df is linear in log K (df to 3 significant digits)."""
    u = math.log(max(n_labels, FEW_LABELS) / FEW_LABELS) / math.log(MANY_LABELS / FEW_LABELS)
    u = min(1.0, u)
    inverse = (1 - u) / DF + u / DF_MANY
    if inverse <= 0:
        return "normal", DF
    return "t", float(f"{1 / inverse:.3g}")


def _check_family(family: str, df: float) -> None:
    if family not in FAMILIES:
        raise NetcleanseError(f"unknown null family {family!r}; use one of {', '.join(FAMILIES)}")
    if family == "t" and not df > 0:
        raise NetcleanseError(f"the t null needs df > 0, got {df}")


def _draw(rng: np.random.Generator, family: str, df: float, shape) -> np.ndarray:
    return rng.standard_normal(shape) if family == "normal" else rng.standard_t(df, shape)


def _min_of(rng: np.random.Generator, family: str, df: float, m: int, n: int) -> np.ndarray:
    """``n`` draws of the minimum of ``m`` independent variables of the family (inverse CDF)."""
    from scipy import stats
    # P(min > x) = S(x)^m, so S(min) = V^(1/m) for V uniform; F(min) = 1 - V^(1/m)
    u = -np.expm1(np.log(rng.random(n)) / m)
    dist = stats.norm if family == "normal" else stats.t(df)
    return dist.ppf(np.clip(u, 1e-300, 1.0))


@lru_cache(maxsize=256)
def null_max_index(n_labels: int, n_reference: int | None = None, family: str = FAMILY, df: float = DF,
                   draws: int = DRAWS, scale: str = "qn", signals: int = 1) -> np.ndarray:
    """Simulated null distribution (sorted) of the largest index ``T`` of a model with ``n_labels``
    labels, scored against all of them (``n_reference`` None) or against a random sample of
    ``n_reference`` of them; ``draws`` models, fixed seed. ``signals=2``: the index is the combined
    one, ``max(z_size, (z_size + z_margin) / sqrt(2))``, of two signals of the family correlated
    ``MARGIN_RHO``."""
    _check_family(family, df)
    if n_labels < 1 or (n_reference is not None and not 1 <= n_reference <= n_labels):
        raise NetcleanseError(f"bad null: {n_labels} labels, reference {n_reference}")
    if signals == 2:
        return _null_combined(n_labels, n_reference, family, df, draws, scale)
    if signals != 1:
        raise NetcleanseError(f"the test combines one or two signals, not {signals}")
    rng = np.random.default_rng(zlib.crc32(f"{n_labels}/{n_reference}/{family}/{df}/{draws}".encode()))
    out = np.empty(draws)
    n = n_labels if n_reference is None else n_reference
    chunk = max(1, 2_000_000 // max(n * (n - 1) // 2 if scale == "qn" and n <= QN_MAX else n, 1))
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        x = _draw(rng, family, df, (m, n))
        low = x.min(axis=1)
        if n_reference is not None and n_labels > n_reference:
            low = np.minimum(low, _min_of(rng, family, df, n_labels - n_reference, m))
        med = np.median(x, axis=1)
        s = robust_scale(x, scale)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + m] = np.where(s > 0, (med - low) / s, 0.0)
    out.sort()
    return out


def _null_combined(n_labels: int, n_reference: int | None, family: str, df: float, draws: int,
                   scale: str, rho: float = MARGIN_RHO) -> np.ndarray:
    """:func:`null_max_index` for two signals: every label's (size, margin) pair is drawn from the
    bivariate family (correlation ``rho`` between the two anomaly directions; for the t family a
    multivariate t, one chi-square per label), the reference (the first ``n_reference`` labels, as
    good as a random sample of i.i.d. labels) fixes each signal's median and scale, and ``T`` is the
    largest index ``max(z_size, (z_size + z_margin) / sqrt(2))`` over all labels (the scan tests only
    some of them, the candidates and the reference, so this is conservative)."""
    rng = np.random.default_rng(zlib.crc32(f"2/{n_labels}/{n_reference}/{family}/{df}/{draws}/{rho}".encode()))
    out = np.empty(draws)
    n = n_labels if n_reference is None else n_reference
    pairs = n * (n - 1) // 2 if scale == "qn" and n <= QN_MAX else n
    chunk = max(1, min(4_000_000 // (2 * n_labels), 2_000_000 // max(pairs, 1)))
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        out[start:start + m] = _label_indices(rng, m, n_labels, n, family, df, scale, 2, rho).max(axis=1)
    out.sort()
    return out


def null_labels(rng: np.random.Generator, m: int, n: int, family: str, df: float, signals: int = 1,
                rho: float = MARGIN_RHO, selected: int = 0, dependence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels of ``m`` simulated models without a backdoor, ``n`` i.i.d. labels each: ``(draws,
    normal)``, ``draws`` of shape (signals, m, n) from the null family (for two signals, pairs whose
    anomaly directions are correlated ``rho``; for the t family a multivariate t, one chi-square per
    label), oriented so that large values are anomalous, and ``normal`` (m, n) the size's normal
    draw before the t family's scale. The two-signal and selected-label nulls and the benchmarks'
    simulated models draw their labels here; the one-signal :func:`null_max_index` draws its own
    (``_draw``, unchanged so that its simulated nulls, and the verdicts decided with them, stay as recorded).

    With ``selected`` > 0 the last ``selected`` labels of each model are the ones with the largest
    selection score ``dependence * g + sqrt(1 - dependence^2) * e`` (``g`` the normal draw of the
    size's anomaly, ``e`` independent noise): at 0 a random choice, at 1 the labels of smallest size
    (before the t family's scale)."""
    g = rng.standard_normal((signals, m, n))
    if signals == 2:
        g[1] = rho * g[0] + math.sqrt(1 - rho * rho) * g[1]
    if selected and dependence > 0:  # (at 0 the last labels of i.i.d. draws are a random choice already)
        score = dependence * g[0] + math.sqrt(max(0.0, 1 - dependence * dependence)) * rng.standard_normal((m, n))
        g = np.take_along_axis(g, np.argsort(score, axis=1)[None], axis=2)
    normal = g[0].copy()
    if family == "t":
        g /= np.sqrt(rng.chisquare(df, (m, n)) / df)
    return g, normal


def _label_indices(rng: np.random.Generator, m: int, n: int, n_reference: int, family: str, df: float,
                   scale: str, signals: int, rho: float, selected: int = 0, dependence: float = 0.0) -> np.ndarray:
    """(m, n) indices of ``m`` simulated models of ``n`` labels (:func:`null_labels`), each scored
    against its first ``n_reference`` labels: the size's index, or ``max(z_size, (z_size +
    z_margin) / sqrt(2))``; with ``selected``, the reference is the labels before the selected ones."""
    g, _ = null_labels(rng, m, n, family, df, signals, rho, selected, dependence)
    z = []
    for x in g:
        ref = x[:, :n_reference]
        s = robust_scale(ref, scale)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            z.append(np.where(s > 0, (x - np.median(ref, axis=1, keepdims=True)) / s, 0.0))
    return z[0] if signals == 1 else np.maximum(z[0], (z[0] + z[1]) / math.sqrt(2))


@lru_cache(maxsize=64)
def _selected_order(n_selected: int, n_reference: int, family: str, df: float, draws: int, scale: str,
                    signals: int, rho: float, dependence: float) -> np.ndarray:
    """(draws, n_selected): each simulated model's indices of its selected labels, largest first
    (the draws of :func:`null_selected_index`; read-only)."""
    _check_family(family, df)
    if n_selected < 1 or n_reference < 1:
        raise NetcleanseError(f"bad null: {n_selected} selected labels, reference {n_reference}")
    if signals not in (1, 2):
        raise NetcleanseError(f"the test combines one or two signals, not {signals}")
    if not 0 <= dependence <= 1:
        raise NetcleanseError(f"the selection's dependence on size must be between 0 and 1, got {dependence}")
    key = f"selected/{signals}/{n_selected}/{n_reference}/{family}/{df}/{draws}/{rho}"
    key += f"/{dependence}" if dependence else ""  # (the seed of the nulls blind to size is unchanged)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    n = n_selected + n_reference
    pairs = n_reference * (n_reference - 1) // 2 if scale == "qn" and n_reference <= QN_MAX else n_reference
    chunk = max(1, min(4_000_000 // (2 * n), 2_000_000 // max(pairs, 1)))
    out = np.empty((draws, n_selected))
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        index = _label_indices(rng, m, n, n_reference, family, df, scale, signals, rho, n_selected, dependence)
        out[start:start + m] = -np.sort(-index[:, n_reference:], axis=1)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=256)
def null_selected_index(n_selected: int, n_reference: int, family: str = FAMILY, df: float = DF,
                        draws: int = DRAWS, scale: str = "qn", signals: int = 1,
                        rho: float = MARGIN_RHO, dependence: float = 0.0) -> np.ndarray:
    """Simulated null distribution (sorted) of the largest index among ``n_selected`` labels scored
    against a reference of ``n_reference`` *other* labels (the transferable labels' stage of
    :func:`calibrated_test`): all ``n_selected + n_reference`` labels i.i.d. draws of the family
    (two signals correlated ``rho``), the selected ones those of largest selection score, a score
    correlated ``dependence`` with the size's anomaly (0: chosen without looking at their sizes; 1:
    the smallest; see :func:`_label_indices`)."""
    return np.sort(_selected_order(n_selected, n_reference, family, df, draws, scale, signals, rho, dependence)[:, 0])


@lru_cache(maxsize=64)
def _ordered_null(n_selected: int, n_reference: int, family: str, df: float, draws: int, scale: str,
                  signals: int, rho: float, dependence: float) -> tuple[np.ndarray, np.ndarray]:
    """The ordered test's null: per order j the sorted j-th largest selected index (columns), and
    the sorted smallest marginal p-value ``min_j P(Z_(j) >= z_(j))`` of every simulated model."""
    order = _selected_order(n_selected, n_reference, family, df, draws, scale, signals, rho, dependence)
    columns = np.sort(order, axis=0)
    p = np.stack([_survival(columns[:, j], order[:, j]) for j in range(n_selected)], axis=1)
    return columns, np.sort(p.min(axis=1))


def ordered_selected_pvalue(indices, n_reference: int, family: str = FAMILY, df: float = DF, draws: int = DRAWS,
                            scale: str = "qn", signals: int = 1, rho: float = MARGIN_RHO,
                            dependence: float = 0.0) -> tuple[float, int]:
    """The ordered test of a selected set: its labels' indices sorted, largest first, z_(1) >= ...
    >= z_(m); per order j the marginal p-value ``p_j = P(Z_(j) >= z_(j))`` under the selected-label
    null (:func:`null_selected_index`'s draws); the statistic ``P* = min_j p_j``, whose own null is
    simulated from the same draws. Returns ``(P(P*_null <= P*), j*)``, j* the largest order at
    which the minimum is reached: the j* most anomalous labels of the set are the ones it flags.
    With one label it is the max test."""
    z = -np.sort(-np.asarray(indices, dtype=float))
    columns, null = _ordered_null(len(z), n_reference, family, df, draws, scale, signals, rho, dependence)
    p = np.array([_survival(columns[:, j], z[j]) for j in range(len(z))])
    j = int(np.flatnonzero(p == p.min())[-1]) + 1
    return float((1 + np.searchsorted(null, p.min(), side="right")) / (draws + 1)), j


def critical_index(n_labels: int, n_reference: int | None = None, alpha: float = 0.05, family: str = FAMILY,
                   df: float = DF, draws: int = DRAWS, scale: str = "qn", signals: int = 1) -> float:
    """The index above which :func:`max_index_pvalue` is <= ``alpha`` (inf if it never is)."""
    null = null_max_index(n_labels, n_reference, family, df, draws, scale, signals)
    # an index z just above null[i - 1] has p = (1 + draws - i) / (draws + 1), which is <= alpha
    # for i >= (draws + 1) (1 - alpha)
    i = max(1, math.ceil((len(null) + 1) * (1 - alpha) - 1e-9))
    return float(null[i - 1]) if i <= len(null) else math.inf


def max_index_pvalue(index: float, n_labels: int, n_reference: int | None = None, family: str = FAMILY,
                     df: float = DF, draws: int = DRAWS, scale: str = "qn", signals: int = 1) -> float:
    """``P(T >= index)`` under the null: (1 + simulated models at least as extreme) / (draws + 1)."""
    return float(_survival(null_max_index(n_labels, n_reference, family, df, draws, scale, signals), index))


def _survival(null: np.ndarray, z):
    """``P(T >= z)`` under a simulated null of ``n`` sorted draws: (1 + draws at least ``z``) / (n + 1)
    (never 0: the observed model counts as one of the draws); ``z`` a number or an array."""
    return (1 + len(null) - np.searchsorted(null, z, side="left")) / (len(null) + 1)


@dataclass
class TestResult:
    """The outcome of :func:`calibrated_test`. ``steps``: one dict per step-down test (label,
    index, p_value, flagged); ``p_values``: every testable label's single-step p-value;
    ``adjusted_p_values``: its step-down (Holm) p-value, the one a scan records and reports: that of
    the step that tested the label (the step that flagged it, or the one that stopped at it; the
    smaller of two for a label tested in both stages), and for a label no step reached the larger
    of its own and the last stage's steps'; so no label's is below the model's, and past the step
    that stopped the test (p above alpha) none is at most alpha."""

    flagged: list[int]
    p_value: float | None  # the model's: its most anomalous label's
    inconclusive: bool
    alpha: float
    steps: list[dict] = field(default_factory=list)
    p_values: dict[int, float] = field(default_factory=dict)
    indices: dict[int, float] = field(default_factory=dict)
    reference: dict = field(default_factory=dict)  # median, scale (log scale), labels, n_labels
    adjusted_p_values: dict[int, float] = field(default_factory=dict)
    size_indices: dict[int, float] = field(default_factory=dict)  # the size's own index per label
    margin_indices: dict[int, float] = field(default_factory=dict)  # the margin's (empty: size only)

    def to_dict(self) -> dict:
        return {"flagged": self.flagged, "p_value": self.p_value, "inconclusive": self.inconclusive,
                "alpha": self.alpha, "steps": self.steps, "reference": self.reference}


def calibrated_test(l1: dict, reference: list[int] | None = None, n_labels: int | None = None,
                    alpha: float = 0.05, family: str | None = None, df: float | None = None, draws: int = DRAWS,
                    scale: str = "qn", min_scale: float = SCALE_FLOOR, margins: dict | None = None,
                    min_margin_scale: float = MARGIN_SCALE_FLOOR, transfer: dict | None = None,
                    transfer_threshold: float | None = None, transfer_dependence: float = TRANSFER_RHO,
                    transfer_ordered: bool = TRANSFER_ORDERED) -> TestResult:
    """The model-level test of the module doc.

    ``l1``: label -> mask L1 of every label that can be flagged (searched with the same budget as
    the reference). ``reference``: the labels whose median/MAD define "normal" (a random sample,
    each also in ``l1``); None = all of ``l1``, as in the paper. ``n_labels``: the model's number of
    labels the most anomalous one was picked from (default ``len(l1)``); with a reference sample,
    labels not in ``l1`` are taken to be no more extreme than those in it. ``margins``: label ->
    maximum logit margin (:mod:`netcleanse.margin`) for every label of ``l1``; with it the index is
    the combined one (module doc), without it the size's alone. ``transfer`` and
    ``transfer_threshold``: each label's expected transferability (:mod:`netcleanse.transferability`)
    and the level at which a label counts as transferable; with them, and an all-label reference,
    the transferable labels are first tested against the others alone (module doc, "Transferable
    labels"); ``transfer_dependence``: how strongly that stage's null lets a clean label's
    transferability follow its ease (0: not at all, 1: the easiest labels transfer). ``transfer_ordered``:
    that stage's first step tests its labels together by their ordered indices (module doc), or
    (False) the most anomalous alone. ``family`` and
    ``df``: the null; None, the default for the model's number of labels (:func:`null_family`).
    """
    if not 0 < alpha < 1:
        raise NetcleanseError(f"alpha must be between 0 and 1, got {alpha}")
    if not 0 <= transfer_dependence <= 1:
        raise NetcleanseError("the transferable labels' dependence on size must be between 0 and 1, "
                              f"got {transfer_dependence}")
    robust_scale(np.zeros(1), scale)  # a clear error for an unknown estimator
    labels = sorted(int(t) for t in l1)
    if not labels:
        raise NetcleanseError("the test needs at least one label")
    if n_labels is not None and n_labels < len(labels):
        raise NetcleanseError(f"n_labels {n_labels} is smaller than the {len(labels)} labels given")
    if family is None:  # the default null for the model's number of labels (t(df) where df is given)
        family, df = null_family(n_labels or len(labels)) if df is None else ("t", df)
    elif df is None:
        df = DF
    _check_family(family, df)
    x = {t: float(log_size(l1[t])) for t in labels}
    if margins is not None:
        missing = [t for t in labels if t not in margins or not math.isfinite(margins[t])]
        if missing:
            raise NetcleanseError(f"label {missing[0]} has no finite maximum margin")
        y = {t: float(np.log(max(float(margins[t]), MARGIN_FLOOR))) for t in labels}
    sample = reference is not None
    ref = sorted(int(t) for t in reference) if sample else list(labels)
    if any(t not in x for t in ref):
        raise NetcleanseError("every reference label needs a mask L1")
    # a margin says something only where the search could make the typical label win: when half the
    # reference labels reach no margin above the floor (a model that answers one class whatever its
    # input, an untrained one), the log scale would blow a margin of 0.01 up to an index of 20 or more
    margins_dropped = margins is not None and float(np.median([margins[t] for t in ref])) <= MARGIN_FLOOR
    if margins_dropped:
        margins = None
    signals = 1 if margins is None else 2
    k = n_labels or len(labels)

    def pvalue(z: float, k_now: int, ref_now: list[int]) -> float:
        return max_index_pvalue(z, k_now, len(ref_now) if sample else None, family, df, draws, scale, signals)

    def fit(values: dict, ref_now: list[int], floor: float) -> tuple[float, float]:
        v = np.array([values[t] for t in ref_now])
        return float(np.median(v)), max(float(robust_scale(v, scale)), floor)

    def score(ref_now: list[int]) -> tuple[dict, dict, dict, dict]:
        """Per label: the size's index, the margin's index (or None) and the test's index, and the fit."""
        med, spread = fit(x, ref_now, min_scale)
        size = {t: (med - x[t]) / spread if spread > 0 else 0.0 for t in labels}
        fitted = {"median": med, "scale": spread}
        if signals == 1:
            return size, {}, size, fitted
        m_med, m_spread = fit(y, ref_now, min_margin_scale)
        margin = {t: (y[t] - m_med) / m_spread if m_spread > 0 else 0.0 for t in labels}
        fitted.update(margin_median=m_med, margin_scale=m_spread)
        return size, margin, {t: max(size[t], (size[t] + margin[t]) / math.sqrt(2)) for t in labels}, fitted

    size_idx, margin_idx, indices, fitted = score(ref)
    spread = fitted["scale"]
    if signals == 1:
        best_possible = (fitted["median"] - float(log_size(0.0))) / spread if spread > 0 else 0.0
        inconclusive = len(ref) < 3 or spread == 0 or pvalue(best_possible, k, ref) > alpha
    else:  # a margin has no ceiling: only a too small or degenerate reference leaves no power
        inconclusive = len(ref) < 3 or spread == 0 or fitted["margin_scale"] == 0
    p_values = {t: pvalue(indices[t], k, ref) for t in labels}
    # what the most anomalous label needs to be flagged: an index above ``crit``, i.e. (a label of
    # median margin) a mask L1 below ``threshold_l1`` (the first step of the step-down; later steps
    # refit without flagged labels)
    crit = (critical_index(k, len(ref) if sample else None, alpha, family, df, draws, scale, signals)
            if spread > 0 and len(ref) >= 3 else math.inf)  # (fewer reference labels: no test, no threshold)
    # (with two signals a label of median margin is flagged by its size index alone: max(z, z / sqrt 2) = z)
    threshold_l1 = (math.exp(fitted["median"] - crit * spread) if math.isfinite(crit)
                    else None if len(ref) < 3 else 0.0)
    result = TestResult([], None, inconclusive, alpha, p_values=p_values, indices=indices,
                        reference={**fitted, "labels": ref, "n_labels": k,
                                   "critical_index": crit if math.isfinite(crit) else None,
                                   "threshold_l1": threshold_l1,
                                   "statistic": "log mask L1" if signals == 1 else
                                   "max(z_size, (z_size + z_margin) / sqrt(2)) of log mask L1 and log maximum margin",
                                   "scale_estimator": scale,
                                   "family": family if family == "normal" else f"t({df:g})",
                                   **({"margins_dropped": "the reference labels' median maximum margin is not above "
                                       f"{MARGIN_FLOOR:g}"} if margins_dropped else {})})
    result.size_indices, result.margin_indices = size_idx, margin_idx
    if spread == 0:
        result.adjusted_p_values = dict(result.p_values)
        return result
    def record_step(t: int, z: float, p: float, n_now: int, n_ref: int, size: dict, margin: dict,
                    fit: dict, stage: str | None = None, powered: bool = True) -> bool:
        """One step-down test, recorded with the reference fit its index came from; whether it
        flagged ``t`` (then added to the flags)."""
        flag = p <= alpha and powered
        step = {"step": len(result.steps) + 1, **({"stage": stage} if stage else {}), "label": t, "index": z,
                "p_value": p, "n_labels": n_now, "n_reference": n_ref, "flagged": flag, "reference": dict(fit)}
        if signals == 2:
            step.update(size_index=size[t], margin_index=margin[t])
        result.steps.append(step)
        if result.p_value is None:
            result.p_value = p
        if flag:
            result.flagged.append(t)
        return flag

    # the transferable labels' stage (module doc): with it, both stages' p-values are doubled (Bonferroni)
    factor, remaining, ref_now, k_now, previous, first = 1.0, list(labels), list(ref), k, 0.0, None
    if transfer is not None and transfer_threshold is not None and not sample and not inconclusive:
        selected = [t for t in labels if float(transfer.get(t, 0.0)) >= transfer_threshold]
        result.reference.update(transfer_threshold=float(transfer_threshold), transferable=selected,
                                transfer_dependence=float(transfer_dependence),
                                transfer_statistic="ordered" if transfer_ordered else "max")
        others = [t for t in labels if t not in selected]
        size_sel, margin_sel, index_sel, fit_sel = score(others) if selected and len(others) >= 3 else (0, 0, 0, {})
        if fit_sel.get("scale", 0) > 0:
            factor = 2.0
            result.reference["stages"] = 2
            # the transferable labels' indices are against the labels outside their set
            result.reference["transferable_reference"] = {**fit_sel, "labels": others}
            # the size test's critical index at its half of alpha
            crit = critical_index(k, None, alpha / factor, family, df, draws, scale, signals)
            result.reference.update(critical_index=crit if math.isfinite(crit) else None,
                                    threshold_l1=math.exp(fitted["median"] - crit * spread) if math.isfinite(crit) else 0.0)
            result.p_values = {t: min(1.0, factor * v) for t, v in result.p_values.items()}

            def selected_p(z: float, m: int) -> float:
                null = null_selected_index(m, len(others), family, df, draws, scale, signals,
                                           dependence=transfer_dependence)
                return min(1.0, factor * float(_survival(null, z)))
            for t in selected:
                result.indices[t], result.p_values[t] = index_sel[t], selected_p(index_sel[t], len(selected))
                result.size_indices[t] = size_sel[t]
                if signals == 2:
                    result.margin_indices[t] = margin_sel[t]
            left = list(selected)
            if transfer_ordered and len(left) > 1:  # the first step tests the set by its ordered indices
                ranked = sorted(left, key=lambda u: (-index_sel[u], u))
                p, j = ordered_selected_pvalue([index_sel[t] for t in ranked], len(others), family, df, draws,
                                               scale, signals, dependence=transfer_dependence)
                p = min(1.0, factor * p)
                for t in ranked[:j] if p <= alpha else ranked[:1]:
                    if not record_step(t, index_sel[t], p, len(left), len(others), size_sel, margin_sel, fit_sel,
                                       "transferable"):
                        break
                    result.p_values[t] = min(result.p_values[t], p)
                    left.remove(t)
                    previous = p
                if not result.flagged:
                    left = []
            while left:
                t = max(left, key=lambda u: (index_sel[u], -u))
                p = max(previous, selected_p(index_sel[t], len(left)))
                if not record_step(t, index_sel[t], p, len(left), len(others), size_sel, margin_sel, fit_sel,
                                   "transferable"):
                    break
                left.remove(t)
                previous = p
            # the step-down goes on over the other labels, refitted without those flagged
            remaining = [t for t in labels if t not in result.flagged]
            ref_now = [t for t in ref if t not in result.flagged]
            k_now = k - len(result.flagged)
            if not result.flagged:
                first = result.p_value
                result.p_value = None  # set below to the smaller of the two stages' first p-values
    while remaining and len(ref_now) >= 3:
        size_now, margin_now, index_now, fit_now = score(ref_now)
        if fit_now["scale"] == 0:
            break
        t = max(remaining, key=lambda u: (index_now[u], -u))
        z = index_now[t]
        p = max(previous, min(1.0, factor * pvalue(z, k_now, ref_now)))
        if not record_step(t, z, p, k_now, len(ref_now), size_now, margin_now, fit_now, powered=not inconclusive):
            break
        remaining.remove(t)
        if t in ref_now:
            ref_now.remove(t)
        k_now -= 1
        previous = p
    if first is not None:  # the transferable stage flagged nothing: the model's p-value is the smaller stage's
        result.p_value = first if result.p_value is None else min(first, result.p_value)
    result.adjusted_p_values = _adjusted(result)
    return result


def _adjusted(result: TestResult) -> dict[int, float]:
    """Every label's step-down p-value (:class:`TestResult`)."""
    decided: dict[int, float] = {}
    for step in result.steps:  # tested in both stages (each at its half of alpha): the smaller
        decided[step["label"]] = min(decided.get(step["label"], 1.0), float(step["p_value"]))
    # a label no step reached was left in the last stage's step-down, past its stopping step
    last_stage = [s for s in result.steps if s.get("stage") is None] or result.steps
    floor = max((float(s["p_value"]) for s in last_stage), default=0.0)
    return {t: decided[t] if t in decided else max(float(p), floor) for t, p in result.p_values.items()}


def most_anomalous(records: list[dict], calibrated: bool = True) -> dict | None:
    """The scan record its rule ranks first: for the calibrated test the smallest ``p_value`` (the
    model's p-value is its), ties broken by the largest ``test_index`` (indices of the transferable
    labels' stage and of the others come from different references, so the index alone can rank a
    label above the one the model's p-value belongs to; records the test did not score, e.g. labels
    a 1283-label scan left at the coarse pass, come after every scored one), for the paper's rule
    the largest ``anomaly_index``. None for no records."""
    def key(r: dict) -> tuple:
        scored = calibrated and r.get("test_index") is not None
        p = r.get("p_value") if scored and r.get("p_value") is not None else math.inf
        return (scored, -p, r["test_index"] if scored else -math.inf, r.get("anomaly_index") or -math.inf)
    return max(records, key=key) if records else None
