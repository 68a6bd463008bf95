"""The MAD anomaly index on vectors worked out by hand."""

import json

import numpy as np
import pytest

from netcleanse.calibrated import TRANSFER_RHO
from netcleanse.detection import MAD_CONSISTENCY, anomaly_indices, flag_labels, index_ceiling, median_and_mad
from netcleanse.errors import NetcleanseError


def test_median_and_mad_by_hand():
    # values 1,2,3,4,100: median 3; |v-3| = 2,1,0,1,97 -> median 1; MAD = 1.4826
    med, mad = median_and_mad([1, 2, 3, 4, 100])
    assert med == 3 and mad == pytest.approx(1.4826)
    # even count: 10,20,30,40: median 25; |dev| = 15,5,5,15 -> median 10
    med, mad = median_and_mad([40, 10, 30, 20])
    assert med == 25 and mad == pytest.approx(14.826)


def test_anomaly_index_by_hand():
    l1 = [100.0, 90.0, 110.0, 95.0, 105.0, 10.0]
    # median 97.5; |dev| = 2.5, 7.5, 12.5, 2.5, 7.5, 87.5 -> median 7.5; MAD = 11.1195
    idx = anomaly_indices(l1)
    assert idx[5] == pytest.approx((97.5 - 10.0) / (1.4826 * 7.5))  # 7.869
    assert idx[5] == pytest.approx(7.8692, abs=1e-3)
    # labels above the median keep their (negative) index and are never flagged
    assert idx[2] == pytest.approx(-12.5 / 11.1195)
    assert flag_labels(range(6), idx) == [5]
    assert flag_labels(range(6), idx, threshold=8.0) == []
    assert MAD_CONSISTENCY == 1.4826


def test_large_trigger_is_not_flagged():
    # a label with a HUGE mask is an outlier too, but only small masks mean a backdoor
    idx = anomaly_indices([50, 52, 48, 51, 49, 500])
    assert flag_labels(range(6), idx) == []
    assert idx[5] < -2


def test_reference_sample_sets_median_and_mad():
    controls = [10, 12, 14, 16, 18]  # median 14, |dev| 4,2,0,2,4 -> 2; MAD 2.9652
    idx = anomaly_indices([4.0, 14.0, 20.0], reference=controls)
    assert idx == pytest.approx([10 / 2.9652, 0.0, -6 / 2.9652])


def test_index_ceiling_bounds_every_index():
    # the earlier hand-worked vector: median 97.5, MAD 11.1195 -> an empty mask would score 8.768
    l1 = [100.0, 90.0, 110.0, 95.0, 105.0, 10.0]
    assert index_ceiling(l1) == pytest.approx(97.5 / 11.1195)
    assert anomaly_indices([0.0], reference=l1)[0] == pytest.approx(index_ceiling(l1))
    assert anomaly_indices(l1).max() < index_ceiling(l1)


def test_widely_spread_labels_cannot_flag_even_a_tiny_trigger():
    # ten labels, two planted targets with masks 10x smaller than the rest: the two outliers and the
    # clean labels' own spread make the MAD large, so no index, not even an empty mask's, passes 2
    l1 = [64.0, 54.0, 38.0, 26.2, 73.1, 3.1, 48.3, 66.9, 8.0, 37.7]
    # median 43.15; |dev| median (16.95 + 20.85) / 2 = 18.9 -> MAD 28.021; ceiling 1.540
    assert index_ceiling(l1) == pytest.approx(43.15 / (1.4826 * 18.9))
    assert index_ceiling(l1) < 2
    assert flag_labels(range(10), anomaly_indices(l1)) == []


def test_the_ceiling_of_labels_scored_against_themselves_moves_their_median_too():
    """With the labels as their own reference, an empty mask in a label's place changes the median
    and MAD: two labels always score +-0.6745, however small one mask is, so none can pass 2."""
    for l1 in ([36.3, 29.0], [36.3, 0.5], [10.0, 11.0, 12.0, 0.0]):
        ceiling = index_ceiling(l1, includes_labels=True)
        for i in range(len(l1)):
            emptied = list(l1[:i]) + [0.0] + list(l1[i + 1:])
            assert anomaly_indices(emptied)[i] <= ceiling + 1e-12
        assert any(anomaly_indices(list(l1[:i]) + [0.0] + list(l1[i + 1:]))[i] == pytest.approx(ceiling)
                   for i in range(len(l1)))
    assert index_ceiling([36.3, 0.5], includes_labels=True) == pytest.approx(1 / MAD_CONSISTENCY)
    assert index_ceiling([36.3, 29.0]) > 2  # against a fixed reference an empty mask would pass
    assert index_ceiling([7.0], includes_labels=True) == 0


def test_zero_mad_flags_nothing():
    assert np.all(anomaly_indices([5, 5, 5, 1]) == 0)
    assert index_ceiling([5, 5, 5, 1]) == 0


def test_bad_inputs():
    with pytest.raises(NetcleanseError):
        median_and_mad([])
    with pytest.raises(NetcleanseError):
        flag_labels([0], [3.0], threshold=0)


def _benchmark(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_null_benchmark_counts_false_alarms(tmp_path):
    mad_null = _benchmark("mad_null")
    rng = np.random.default_rng(1)
    # the hand-worked vector above has one flagged label (10); no spread flags nothing; a threshold
    # above its index (7.87) flags nothing either
    worked = [100.0, 90.0, 110.0, 95.0, 105.0, 10.0]
    assert mad_null.false_alarms(np.array([worked, [7.0] * 6]), 2.0) == (0.5, 0.5)
    assert mad_null.false_alarms(np.array([worked]), 8.0) == (0.0, 0.0)
    # normal draws: the rule's per-model false-alarm rate with ten labels is far above 5 %
    rate, mean_flags = mad_null.false_alarms(rng.normal(size=(2000, 10)), 2.0)
    assert 0.2 < rate < 0.5 and mean_flags >= rate
    # the empirical null reads detection_quality's rows and compares with what it observed there
    (tmp_path / "rows").mkdir()
    for i in range(4):
        l1 = rng.lognormal(3.0, 0.3, 10)
        if i == 1:
            l1[4] = 0.5  # a clean model that the calibrated test flags
        scan = {"labels": [{"label": t, "mask_l1": float(v)} for t, v in enumerate(l1)],
                "mad_flagged": [2] if i == 0 else [], "settings": {"detection": {"scheme": "all labels"}}}
        row = {"entry": {"backdoored": False, "split": "dev"}, "scan": scan}
        (tmp_path / "rows" / f"clean_{i}.json").write_text(json.dumps(row))
    out = tmp_path / "null.json"
    assert mad_null.main(["--labels", "10", "--draws", "200", "--rows", str(tmp_path), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["observed"] == {"clean_scans": 4, "mad": 0.25, "calibrated": 0.25}
    for null in ("normal", "lognormal", "log-t", "empirical"):
        assert 0 <= row[null]["mad_rate"] <= 1 and 0 <= row[null]["calibrated_rate"] <= 1
    # on its own null model the calibrated test holds its level where the paper's rule does not
    assert row["log-t"]["calibrated_rate"] < 0.05 + 3 * (0.05 * 0.95 / 200) ** 0.5 < row["log-t"]["mad_rate"]
    assert mad_null.main(["--labels", "ten"]) == 2
    assert mad_null.main(["--labels", "10", "--rows", str(tmp_path / "nothing")]) == 2
    assert mad_null.main(["--labels", "10", "--rows", str(tmp_path), "--split", "eval"]) == 2


def test_null_benchmark_measures_the_two_stage_test_with_and_without_its_assumption():
    mad_null = _benchmark("mad_null")
    rng = np.random.default_rng(3)
    samples = mad_null.pair_samples(rng, 300, 10, 0.5, normal=True)
    random = mad_null.two_stage_flags(*samples, 0.05, rng, dependence=0.0).mean()
    allowed = mad_null.two_stage_flags(*samples, 0.05, rng, dependence=TRANSFER_RHO).mean()
    easiest = mad_null.two_stage_flags(*samples, 0.05, rng, dependence=1.0).mean()
    # up to the test's allowance for easy labels that transfer: about alpha; the easiest labels: above it
    assert random < 0.1 and allowed < 0.1 and easiest > random