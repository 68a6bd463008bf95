"""The calibrated model-level test: worked vectors, its level on simulated models without a backdoor,
uniform p-values (KS), step-down for several targets, and the scan/CLI wiring."""

import numpy as np
import pytest
from scipy import stats

from netcleanse.calibrated import (DF, FLOOR, calibrated_test, log_size, max_index_pvalue, null_family,
                                  null_max_index)
from netcleanse.detection import median_and_mad
from netcleanse.errors import NetcleanseError
from netcleanse.scanning import ScanResult, calibrated_inputs


def _clean_model(rng, k, spread=0.4, median=50.0, df=None):
    """Mask L1s of a model without a backdoor: log-normal around ``median`` (log-t with ``df``)."""
    noise = rng.standard_normal(k) if df is None else rng.standard_t(df, k)
    return dict(enumerate(np.exp(np.log(median) + spread * noise)))


def test_log_index_by_hand():
    l1 = {0: 100.0, 1: 90.0, 2: 110.0, 3: 95.0, 4: 105.0, 5: 10.0}
    res = calibrated_test(l1, alpha=0.05, scale="mad", min_scale=0.0)
    x = np.log([100.0, 90.0, 110.0, 95.0, 105.0, 10.0])
    med, mad = median_and_mad(x)
    assert res.reference["median"] == pytest.approx(med) and res.reference["scale"] == pytest.approx(mad)
    assert res.indices[5] == pytest.approx((med - np.log(10.0)) / mad)
    # the p-value of the most anomalous label is the model's; it is the simulated tail of the largest index
    assert res.p_value == pytest.approx(max_index_pvalue(res.indices[5], 6, scale="mad"))
    # Qn by hand on the same log sizes: pairwise distances, h = 4, the C(4,2) = 6th smallest, x 2.2219
    d = sorted(abs(a - b) for i, a in enumerate(x) for b in x[i + 1:])
    assert calibrated_test(l1, min_scale=0.0).reference["scale"] == pytest.approx(2.2219 * d[5])
    assert res.steps[0]["label"] == 5 and res.flagged == [5]
    # masks below half a pixel are not told apart
    assert log_size([0.0, 0.1, FLOOR, 2.0]) == pytest.approx(np.log([FLOOR, FLOOR, FLOOR, 2.0]))


def test_scale_free():
    rng = np.random.default_rng(0)
    l1 = _clean_model(rng, 10)
    l1[3] = 4.0
    a = calibrated_test(l1)
    b = calibrated_test({t: 3.0 * v for t, v in l1.items()})
    assert a.p_value == pytest.approx(b.p_value) and a.flagged == b.flagged


def test_null_is_sorted_reproducible_and_grows_with_labels():
    a, b = null_max_index(10), null_max_index(10)
    assert a is b and np.all(np.diff(a) >= 0)
    # more labels, larger maxima: the 95 % point rises from 43 to 1283 labels (same reference size)
    assert np.quantile(null_max_index(1283, 48), 0.95) > np.quantile(null_max_index(100, 48), 0.95)
    assert max_index_pvalue(1e9, 10) == pytest.approx(1 / (len(a) + 1))
    assert max_index_pvalue(-1e9, 10) == 1.0


@pytest.mark.parametrize("k, controls", [(10, None), (43, None), (1283, 48)])
def test_level_holds_and_p_values_are_uniform_on_models_without_a_backdoor(k, controls):
    """The per-model false-alarm rate is alpha whatever the number of labels, on models drawn from
    the test's own null for that many labels (log sizes t(10) up to 100 labels, t(20) from 1000 on);
    p-values uniform (no scale floor: it only makes the test more conservative)."""
    rng = np.random.default_rng(k)
    family, df = null_family(k)
    ps, flagged = [], 0
    for _ in range(600):
        l1 = _clean_model(rng, k, df=None if family == "normal" else df)
        if controls:
            ref = sorted(rng.choice(k, controls, replace=False).tolist())
            # the scan refines the 16 smallest (coarse) labels and the controls
            candidates = sorted(l1, key=l1.get)[:16]
            res = calibrated_test({t: l1[t] for t in set(ref) | set(candidates)}, ref, n_labels=k, min_scale=0.0)
        else:
            res = calibrated_test(l1, min_scale=0.0)
        ps.append(res.p_value)
        flagged += bool(res.flagged)
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert flagged / 600 < 0.05 + 3 * np.sqrt(0.05 * 0.95 / 600)
    assert flagged / 600 > 0.01


def test_the_default_null_depends_on_the_number_of_labels():
    """t(10) up to 100 labels, the many-labels family from 1000 on, 1 / df linear in log K between;
    a test without ``family`` uses the one of its model's number of labels (``n_labels``, not the
    number of labels it was given), and records it."""
    from netcleanse import calibrated as cal

    assert null_family(10) == null_family(100) == ("t", DF)
    many = null_family(1000)
    assert null_family(1283) == many and null_family(100_000) == many
    inverse = (lambda f: 0.0 if f[0] == "normal" else 1 / f[1])
    assert inverse(many) == pytest.approx(0.0 if cal.DF_MANY == float("inf") else 1 / cal.DF_MANY)
    mid = null_family(316)  # half-way in log K: 1 / df half-way
    # (df is rounded to 3 significant digits)
    assert mid[0] == "t" and 1 / mid[1] == pytest.approx((1 / DF + inverse(many)) / 2, rel=4e-3)
    rng = np.random.default_rng(3)
    l1 = _clean_model(rng, 64)
    ref = sorted(range(0, 64, 2))
    for k in (64, 316, 1283):
        res = calibrated_test(l1, ref, n_labels=k)
        family, df = null_family(k)
        assert res.reference["family"] == (family if family == "normal" else f"t({df:g})")
        explicit = calibrated_test(l1, ref, n_labels=k, family=family, df=df)
        assert res.p_value == explicit.p_value and res.indices == explicit.indices
    assert calibrated_test(l1, ref, n_labels=1283, family="t").reference["family"] == f"t({DF:g})"
    assert calibrated_test(l1, ref, n_labels=1283, df=5.0).reference["family"] == "t(5)"


def test_lighter_tailed_clean_models_are_flagged_less_often_than_alpha():
    # log-normal clean labels: lighter-tailed than the t(10) null, so the test is conservative
    rng = np.random.default_rng(7)
    flagged = sum(bool(calibrated_test(_clean_model(rng, 10)).flagged) for _ in range(400))
    assert flagged / 400 < 0.05


def test_several_targets_are_flagged_in_step_down_order():
    # eight clean labels 40-62 (log spread ~0.15), two planted targets with masks of 3 and 6
    l1 = dict(enumerate([48.0, 55.0, 3.0, 40.0, 62.0, 51.0, 44.0, 6.0, 58.0, 46.0]))
    res = calibrated_test(l1)
    assert res.flagged == [2, 7]
    assert [s["label"] for s in res.steps][:2] == [2, 7] and res.steps[-1]["flagged"] is False
    assert [s["n_labels"] for s in res.steps] == [10, 9, 8]
    ps = [s["p_value"] for s in res.steps]
    assert ps == sorted(ps)  # monotone, as in Holm's procedure
    # the largest index is alone in the step-down's first step and gives the model's p-value
    assert res.p_value == ps[0] <= 0.05


def test_clean_labels_spread_widely_are_not_flagged():
    # ten labels, a "1" much easier than a "0": a spread the paper's rule flags (index > 2)
    l1 = dict(enumerate([64.0, 12.0, 38.0, 26.2, 73.1, 41.0, 48.3, 66.9, 55.0, 37.7]))
    res = calibrated_test(l1)
    assert res.flagged == [] and res.p_value > 0.05 and not res.inconclusive


def test_inconclusive_when_nothing_could_be_flagged():
    two = calibrated_test({0: 5.0, 1: 7.0})  # two labels: no test, so no threshold to state
    assert two.inconclusive and two.reference["critical_index"] is None and two.reference["threshold_l1"] is None
    # no spread at all: without a floor nothing can be told apart; with it, a much smaller mask can
    assert calibrated_test({t: 9.0 for t in range(10)}, min_scale=0.0).inconclusive
    res = calibrated_test({t: 9.0 for t in range(10)} | {10: 1.0}, min_scale=0.0)
    assert res.inconclusive and res.flagged == []
    res = calibrated_test({t: 9.0 for t in range(10)} | {10: 1.0})
    assert not res.inconclusive and res.flagged == [10]


def test_bad_arguments():
    with pytest.raises(NetcleanseError, match="alpha"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, alpha=1.5)
    with pytest.raises(NetcleanseError, match="reference"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, reference=[5])
    with pytest.raises(NetcleanseError, match="family"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, family="cauchy")
    with pytest.raises(NetcleanseError, match="scale"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, scale="iqr")
    with pytest.raises(NetcleanseError, match="n_labels"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, n_labels=2)


def test_calibrated_inputs_follow_the_scan_scheme():
    records = [{"label": t, "mask_l1": float(10 + t)} for t in range(6)]
    l1, ref, k = calibrated_inputs(records, {"scheme": "all labels"})
    assert ref is None and k == 6 and l1 == {t: 10.0 + t for t in range(6)}
    l1, ref, k = calibrated_inputs(records, {"scheme": "random controls", "candidates": [0, 1], "controls": [3, 4, 5]})
    assert ref == [3, 4, 5] and k == 6 and set(l1) == {0, 1, 3, 4, 5}


def test_cli_verdict_of_the_calibrated_rule():
    from netcleanse.cli.scan import verdict
    records = [{"label": t, "mask_l1": l1, "anomaly_index": a, "flagged": t == 1, "p_value": p}
               for t, l1, a, p in [(0, 90.0, 0.1, 0.9), (1, 10.0, 3.4, 0.003), (2, 300.0, -0.5, 1.0)]]
    test = {"flagged": [1], "p_value": 0.003, "inconclusive": False}
    result = ScanResult(labels=records, flagged=[1], threshold=2.0, preset="fast", data="data-free", elapsed_s=1.0,
                        model={}, settings={}, masks=np.zeros((3, 2, 2)), patterns=np.zeros((3, 1, 2, 2)),
                        rule="calibrated", alpha=0.05, test=test, mad_flagged=[1])
    line = verdict(result)
    assert line.startswith("BACKDOOR DETECTED (model-level p = 0.003, alpha 0.05): 1 of 3 labels flagged")
    assert "1 (p 0.003, index 3.40, mask L1 10.0" in line and result.verdict == "backdoor-detected"
    result.flagged, result.test = [], dict(test, flagged=[], p_value=0.4)
    assert result.verdict == "none-detected" and verdict(result).startswith("no backdoor detected (model-level p = 0.4")
    result.test["inconclusive"] = True
    assert result.verdict == "inconclusive" and verdict(result).startswith("INCONCLUSIVE")
    assert result.to_dict()["p_value"] == 0.4 and result.to_dict()["rule"] == "calibrated"


def test_scale_floor_keeps_a_tight_cluster_from_inventing_outliers():
    # six clean labels within a few percent of each other, three at 70 % of them, one real target:
    # the clean labels' own spread (Qn ~0.09) would make the 70 % labels look extreme
    l1 = dict(enumerate([232.9, 253.2, 167.6, 168.4, 239.5, 7.6, 245.9, 279.2, 166.5, 260.7]))
    # (under a normal null, where the effect shows; the default t(10) null is itself more cautious)
    loose = calibrated_test(l1, min_scale=0.0, family="normal")
    floored = calibrated_test(l1, min_scale=0.2, family="normal")
    assert floored.flagged == [5] and set(loose.flagged) > {5}
    # at step 2 (label 5 removed) the remaining labels' spread is below the floor, which then sets the scale
    remaining = np.log([v for t, v in l1.items() if t != 5])
    assert floored.steps[1]["index"] == pytest.approx((np.median(remaining) - np.log(l1[8])) / 0.2)
    assert floored.steps[1]["index"] < loose.steps[1]["index"]
    # the floor only ever lowers indices, so the test stays at or below its level
    assert all(floored.indices[t] <= loose.indices[t] + 1e-12 for t in l1 if loose.indices[t] > 0)


def test_critical_index_and_threshold_l1_match_the_p_values():
    from netcleanse.calibrated import critical_index
    crit = critical_index(10)
    assert max_index_pvalue(np.nextafter(crit, np.inf), 10) <= 0.05 < max_index_pvalue(crit, 10)
    l1 = dict(enumerate([48.0, 55.0, 30.0, 40.0, 62.0, 51.0, 44.0, 39.0, 58.0, 46.0]))
    ref = calibrated_test(l1).reference
    assert ref["critical_index"] == crit
    # a label just below the threshold L1 is flagged, one just above is not
    for factor, flagged in ((0.99, True), (1.01, False)):
        res = calibrated_test(l1 | {2: factor * ref["threshold_l1"]})
        assert (res.flagged == [2]) is flagged


# ---- two signals: trigger size and maximum margin (netcleanse.margin) -----------------------------

def _clean_pairs(rng, k, rho=0.5, df=DF, spread=(0.4, 0.2)):
    """(mask L1s, margins) of a model without a backdoor, drawn from the two-signal null: the anomaly
    directions (small size, large margin) correlated ``rho``, bivariate t."""
    g = rng.standard_normal((2, k))
    g[1] = rho * g[0] + np.sqrt(1 - rho * rho) * g[1]
    g /= np.sqrt(rng.chisquare(df, k) / df)
    l1 = np.exp(np.log(50.0) - spread[0] * g[0])
    margin = np.exp(np.log(30.0) + spread[1] * g[1])
    return dict(enumerate(l1)), dict(enumerate(margin))


@pytest.mark.parametrize("k, controls", [(10, None), (100, 48)])
def test_two_signal_level_holds_on_models_without_a_backdoor(k, controls):
    rng = np.random.default_rng(100 + k)
    ps, flagged = [], 0
    for _ in range(400):
        l1, margin = _clean_pairs(rng, k)
        if controls:
            ref = sorted(rng.choice(k, controls, replace=False).tolist())
            tested = set(ref) | set(sorted(l1, key=l1.get)[:16])
            res = calibrated_test({t: l1[t] for t in tested}, ref, n_labels=k, min_scale=0.0,
                                  margins={t: margin[t] for t in tested}, min_margin_scale=0.0)
        else:
            res = calibrated_test(l1, min_scale=0.0, margins=margin, min_margin_scale=0.0)
        ps.append(res.p_value)
        flagged += bool(res.flagged)
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert 0.01 < flagged / 400 < 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)


def test_an_extreme_margin_flags_a_label_whose_size_alone_does_not():
    rng = np.random.default_rng(3)
    l1, margin = _clean_pairs(rng, 40, rho=0.0)
    suspect = max(l1, key=lambda t: -l1[t])  # the label with the smallest mask: clean, but easiest
    margin[suspect] = 30.0 * np.exp(5.0)  # driven far beyond every other label
    size_only = calibrated_test(l1)
    both = calibrated_test(l1, margins=margin)
    assert size_only.flagged == []
    assert both.flagged == [suspect]
    assert both.indices[suspect] > both.size_indices[suspect]
    assert both.steps[0]["margin_index"] == pytest.approx(both.margin_indices[suspect])


def test_the_size_signal_is_not_diluted_by_an_ordinary_margin():
    # a planted trigger far smaller than every other label's, with a margin like every other label's
    l1 = dict(enumerate([48.0, 55.0, 3.0, 40.0, 62.0, 51.0, 44.0, 58.0, 46.0, 52.0]))
    margin = {t: 30.0 + t for t in l1}
    res = calibrated_test(l1, margins=margin)
    assert res.flagged == [2]
    assert res.indices[2] == pytest.approx(res.size_indices[2])  # max(size, combined) took the size
    # a label of median margin is flagged exactly when its mask is below the recorded threshold
    assert res.reference["threshold_l1"] > 3.0


def test_margins_that_most_labels_never_reach_are_left_out():
    # a model that answers one class whatever its input: the margin search makes no other label win,
    # so its margins sit at or below the floor, and a margin of 0.015 against -0.03 would be an index
    # of 20 on the log scale; the test decides on sizes alone (as a sweep's untrained net showed)
    l1 = dict(enumerate([944.0, 1020.0, 1022.0, 990.0, 1001.0, 1010.0]))
    margin = {0: 0.015, 1: -0.026, 2: -0.057, 3: -0.01, 4: 0.0005, 5: -0.2}
    res = calibrated_test(l1, margins=margin)
    assert res.flagged == [] and res.margin_indices == {} and "margins_dropped" in res.reference
    assert res.reference["statistic"] == "log mask L1" and res.indices == res.size_indices
    reached = calibrated_test(l1, margins={t: 5.0 + t for t in l1})  # margins most labels reach: kept
    assert reached.margin_indices and "margins_dropped" not in reached.reference


def test_two_signal_arguments():
    with pytest.raises(NetcleanseError, match="margin"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, margins={0: 1.0, 1: 2.0})
    with pytest.raises(NetcleanseError, match="margin"):
        calibrated_test({0: 1.0, 1: 2.0, 2: 3.0}, margins={0: 1.0, 1: 2.0, 2: float("nan")})
    assert calibrated_test({0: 5.0, 1: 7.0}, margins={0: 1.0, 1: 2.0}).inconclusive  # two labels


def test_most_anomalous_is_the_label_the_rule_ranks_first():
    """With 1283 labels most are left at the coarse pass, whose paper's index is against the other
    coarse masks: under the calibrated rule the label named most anomalous (and the p-value printed
    beside it) must be the test's own first, not a coarse label with a larger paper's index."""
    from types import SimpleNamespace

    from netcleanse.calibrated import most_anomalous
    from netcleanse.cli.scan import verdict
    records = [{"label": 691, "mask_l1": 616.1, "anomaly_index": 1.98, "test_index": None, "p_value": None},
               {"label": 0, "mask_l1": 89.3, "anomaly_index": 1.96, "test_index": 4.49, "p_value": 0.7},
               {"label": 295, "mask_l1": 114.3, "anomaly_index": 1.69, "test_index": 3.22, "p_value": 0.99}]
    assert most_anomalous(records)["label"] == 0
    assert most_anomalous(records, calibrated=False)["label"] == 691
    assert most_anomalous([]) is None
    # two stages (transferable labels against the others): their indices come from different
    # references, so the label the model's p-value belongs to is the one of smallest p
    staged = [{"label": 0, "mask_l1": 0.0, "anomaly_index": 1.67, "test_index": 2.1, "p_value": 0.0698},
              {"label": 7, "mask_l1": 8.2, "anomaly_index": 1.36, "test_index": 3.4, "p_value": 0.1426}]
    assert most_anomalous(staged)["label"] == 0
    result = SimpleNamespace(labels=records, rule="calibrated", p_value=0.7, alpha=0.05, verdict="none-detected",
                             flagged=[])
    assert verdict(result).endswith("most anomalous label 0 (p 0.7, index 1.96, mask L1 89.3)")
