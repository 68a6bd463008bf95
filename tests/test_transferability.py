"""Expected transferability (netcleanse.transferability), the plan that measures it (data-free scans
of models with few labels) and the calibrated test's transferable labels' stage."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import TARGET, make_data
from netcleanse.calibrated import TRANSFER_RHO, calibrated_test, null_selected_index
from netcleanse.errors import NetcleanseError
from netcleanse.presets import PRESETS
from netcleanse.transferability import expected_transferability


@pytest.fixture(scope="module")
def inputs():
    return make_data(160, torch.Generator().manual_seed(5))[0]


def test_the_planted_target_transfers_and_no_clean_label_does(one_thread, badnet, inputs):
    from conftest import train_tiny
    labels = list(range(badnet.num_classes))
    bad = expected_transferability(badnet, inputs, labels, generator=torch.Generator().manual_seed(0))
    clean = expected_transferability(train_tiny(False), inputs, labels, generator=torch.Generator().manual_seed(0))
    assert max(bad, key=bad.get) == TARGET
    # the tiny net's own templates are near-universal too; the shipped threshold still separates them
    assert bad[TARGET] >= PRESETS["fast"].few_labels_data_free_transfer > max(clean.values())
    assert bad[TARGET] > 2 * max(v for t, v in bad.items() if t != TARGET)
    assert bad[TARGET] > 2 * max(clean.values())
    assert all(0.0 <= v <= 1.0 for v in list(bad.values()) + list(clean.values()))


def test_transferability_is_reproducible_and_a_label_without_sources_gets_zero(one_thread, badnet, inputs):
    a = expected_transferability(badnet, inputs, [TARGET, 1], steps=40, generator=torch.Generator().manual_seed(3))
    b = expected_transferability(badnet, inputs, [TARGET, 1], steps=40, generator=torch.Generator().manual_seed(3))
    assert a == b
    one = inputs[:1]  # a single input: no other input to try a trigger on
    assert expected_transferability(badnet, one, [0, 1], steps=5, generator=torch.Generator()) == {0: 0.0, 1: 0.0}


def test_scans_of_models_with_few_labels_measure_transferability_and_only_data_free_ones_take_the_goal():
    fast = PRESETS["fast"]
    free = fast.for_labels(10, data_free=True)
    assert free.transfer_threshold == fast.few_labels_data_free_transfer is not None
    assert free.coarse.schedule.attack_threshold == free.refine.schedule.attack_threshold == fast.few_labels_data_free_goal
    # with data: the threshold of its own, the search the plan's own (its goal untouched)
    data = fast.for_labels(10)
    assert data.transfer_threshold == fast.few_labels_data_transfer is not None
    assert data.transfer_threshold != free.transfer_threshold
    assert data.refine.schedule.attack_threshold == 0.99 and data.refine == fast.few_labels_refine
    for data_free in (False, True):  # many labels: never measured
        many = fast.for_labels(1283, data_free=data_free)
        assert many is fast and many.transfer_threshold is None
    off = replace(fast, few_labels_data_free_goal=None, few_labels_data_free_transfer=None).for_labels(10, data_free=True)
    assert off.transfer_threshold is None and off.refine.schedule.attack_threshold == 0.99
    no_data_transfer = replace(fast, few_labels_data_transfer=None)
    assert no_data_transfer.for_labels(10).transfer_threshold is None
    assert "transfer_threshold" not in no_data_transfer.for_labels(10).to_dict()
    assert free.to_dict()["transfer_threshold"] != data.to_dict()["transfer_threshold"]
    # the budget is recorded once, whichever threshold is set
    only_data = replace(fast, few_labels_data_free_transfer=None).to_dict()
    assert only_data["few_labels_data_transfer"] == fast.few_labels_data_transfer
    assert only_data["transfer"]["sources"] == fast.transfer_sources


def test_a_data_free_scan_of_few_labels_records_each_labels_transferability(one_thread, badnet, tmp_path):
    import netcleanse
    from netcleanse.report import render_report
    result = netcleanse.scan(badnet, data_free=True, progress=False, out=tmp_path / "scan")
    html = render_report(tmp_path / "scan").read_text()
    assert result.test["reference"]["stages"] == 2  # the target transfers: tested first
    assert result.test["reference"]["transferable"] == [TARGET]
    assert "(transferable)" in html and "the size test's own level here" in html
    assert f"easy labels are the likelier to transfer (correlation {TRANSFER_RHO:g}" in html
    assert result.test["reference"]["transfer_dependence"] == TRANSFER_RHO
    assert "Its first step tested them together" in html
    assert "decided with another version of the null" not in html
    assert all(0.0 <= r["transferability"] <= 1.0 for r in result.labels)
    assert result.settings["detection"]["transfer_threshold"] == PRESETS["fast"].few_labels_data_free_transfer
    assert result.settings["passes"]["transfer"] > 0
    assert result.flagged == [TARGET]


# a development-half row (10-label MNIST BadNet, targets 5 and 8, data-free, attack-success goal 0.5):
# mask L1s and maximum margins as the scan recorded them
DEV_L1 = {8: 5.0, 5: 6.0, 2: 30.0, 3: 36.0, 1: 36.0, 7: 76.0, 6: 78.0, 0: 88.0, 4: 105.0, 9: 158.0}
DEV_MARGIN = {8: 56.6, 5: 61.6, 2: 40.8, 3: 40.0, 1: 39.3, 7: 41.8, 6: 25.9, 0: 27.0, 4: 30.5, 9: 21.8}


def test_transferable_targets_no_longer_hide_each_other():
    alone = calibrated_test(DEV_L1, margins=DEV_MARGIN)
    assert alone.flagged == []  # each target sits in the other's reference
    transfer = {t: (0.3 if t in (5, 8) else 0.01) for t in DEV_L1}
    # if transferability were unrelated to ease, this row's two targets would be found
    free = calibrated_test(DEV_L1, margins=DEV_MARGIN, transfer=transfer, transfer_threshold=0.05,
                           transfer_dependence=0.0)
    assert sorted(free.flagged) == [5, 8]
    # with the allowance for easy clean labels that transfer, the first stage that tests the most
    # anomalous transferable label alone (the test until 2026-12-04) missed this row: p 0.12
    one_by_one = calibrated_test(DEV_L1, margins=DEV_MARGIN, transfer=transfer, transfer_threshold=0.05,
                                 transfer_dependence=0.5, transfer_ordered=False)
    assert one_by_one.flagged == [] and free.p_value < 0.05 < one_by_one.p_value < alone.p_value
    # the shipped first stage tests both together by their ordered indices: found, under a larger allowance
    guarded = calibrated_test(DEV_L1, margins=DEV_MARGIN, transfer=transfer, transfer_threshold=0.05)
    assert sorted(guarded.flagged) == [5, 8] and guarded.p_value <= 0.05
    assert guarded.reference["transfer_dependence"] == TRANSFER_RHO > 0.5
    assert guarded.reference["transfer_statistic"] == "ordered"
    both = calibrated_test({**DEV_L1, 5: 2.0, 8: 2.0}, margins=DEV_MARGIN, transfer=transfer, transfer_threshold=0.05)
    assert calibrated_test({**DEV_L1, 5: 2.0, 8: 2.0}, margins=DEV_MARGIN).flagged == []
    assert sorted(both.flagged) == [5, 8]
    assert [s.get("stage") for s in both.steps[:2]] == ["transferable"] * 2
    assert not both.steps[-1]["flagged"]  # then the size test over the others, which flags none
    assert both.reference["transferable"] == [5, 8] and both.p_value <= 0.05
    # every step records the reference its index came from: the transferable ones the labels outside
    # the set, the next the refitted all-label one; the recorded index follows from it
    import math
    from netcleanse.calibrated import log_size
    assert sorted(both.reference["transferable_reference"]["labels"]) == sorted(t for t in DEV_L1 if t not in (5, 8))
    for step in both.steps:
        fit, t = step["reference"], step["label"]
        assert step["size_index"] == pytest.approx((fit["median"] - float(log_size(({**DEV_L1, 5: 2.0, 8: 2.0})[t])))
                                                   / fit["scale"])
        assert step["margin_index"] == pytest.approx((math.log(DEV_MARGIN[t]) - fit["margin_median"])
                                                     / fit["margin_scale"])
    assert both.steps[0]["reference"] == {k: v for k, v in both.reference["transferable_reference"].items()
                                          if k != "labels"}
    # no label transferable: the test as without it
    none = calibrated_test(DEV_L1, margins=DEV_MARGIN, transfer={t: 0.0 for t in DEV_L1}, transfer_threshold=0.05)
    assert none.flagged == alone.flagged and none.p_value == alone.p_value


def test_an_untransferable_stage_falls_back_to_the_size_test_at_half_the_level():
    l1 = dict(enumerate([48.0, 55.0, 3.0, 40.0, 62.0, 51.0, 44.0, 30.0, 58.0, 46.0]))
    transfer = {t: (0.2 if t == 7 else 0.0) for t in l1}  # a transferable label of ordinary size
    alone = calibrated_test(l1)
    res = calibrated_test(l1, transfer=transfer, transfer_threshold=0.05)
    assert res.flagged == alone.flagged == [2]  # found by the size test after the transferable stage
    assert res.steps[0]["stage"] == "transferable" and res.steps[0]["flagged"] is False
    size_steps = [s for s in res.steps if "stage" not in s]
    assert size_steps[0]["p_value"] == pytest.approx(min(1.0, 2 * alone.steps[0]["p_value"]))
    assert res.p_value == min(res.steps[0]["p_value"], size_steps[0]["p_value"])
    # the size test's critical index is its half of alpha's
    from netcleanse.calibrated import critical_index
    assert res.reference["critical_index"] == pytest.approx(critical_index(10, None, 0.025))
    assert res.reference["critical_index"] > alone.reference["critical_index"]


def test_after_the_transferable_labels_the_step_down_goes_on_over_the_others():
    # targets 0 and 1 transfer, target 2 does not (a weak third target): all three flagged
    l1 = dict(enumerate([4.0, 5.0, 6.0, 60.0, 75.0, 90.0, 110.0, 70.0, 85.0, 100.0]))
    transfer = {t: (0.3 if t in (0, 1) else 0.0) for t in l1}
    res = calibrated_test(l1, transfer=transfer, transfer_threshold=0.05)
    assert res.flagged[:2] == [0, 1] and sorted(res.flagged) == [0, 1, 2]
    assert [s.get("stage") for s in res.steps[:2]] == ["transferable"] * 2 and "stage" not in res.steps[2]


def _false_alarms(dependence, allowance=TRANSFER_RHO, models=400, seed=11):
    """Fraction of simulated clean 10-label models flagged when 1-3 labels transfer: those of largest
    score ``dependence * (size anomaly) + noise`` (0: random labels, 1: the easiest)."""
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(models):
        g = rng.standard_t(10, 10)
        l1 = dict(enumerate(np.exp(np.log(50.0) - 0.4 * g)))
        score = dependence * g / np.std(g) + np.sqrt(1 - dependence ** 2) * rng.standard_normal(10)
        chosen = np.argsort(-score)[:rng.integers(1, 4)]
        transfer = {t: (0.5 if t in chosen else 0.0) for t in l1}
        flagged += bool(calibrated_test(l1, transfer=transfer, transfer_threshold=0.05, draws=4000,
                                        transfer_dependence=allowance).flagged)
    return flagged / models


def test_the_test_holds_its_level_when_transferability_is_unrelated_to_size():
    # the clean labels' log sizes are t(10) draws, the null's own family: at most alpha, up to noise
    assert _false_alarms(0.0) < 0.075


def test_the_level_holds_when_easy_clean_labels_transfer_up_to_the_allowance():
    # transferability that follows ease as far as the allowance: still at most alpha, up to noise;
    # the easiest labels transferring (beyond it): a little above, far below a null that ignores it
    assert _false_alarms(TRANSFER_RHO) < 0.075
    worst, ignored = _false_alarms(1.0), _false_alarms(1.0, allowance=0.0)
    assert worst < 0.11 and ignored > 0.12 and ignored > worst + 0.04


def test_the_selected_labels_null_grows_with_the_selections_dependence_on_size():
    nulls = [null_selected_index(1, 9, draws=4000, dependence=d) for d in (0.0, 0.5, 1.0)]
    q = [np.quantile(n, 0.975) for n in nulls]
    assert q[0] < q[1] < q[2]
    with pytest.raises(NetcleanseError, match="between 0 and 1"):
        null_selected_index(1, 9, draws=4000, dependence=1.5)


def test_the_selected_labels_null_grows_with_the_number_selected():
    one = null_selected_index(1, 7, draws=4000)
    three = null_selected_index(3, 7, draws=4000)
    assert np.quantile(three, 0.95) > np.quantile(one, 0.95) > 0


def test_the_ordered_test_of_one_selected_label_is_the_max_test():
    from netcleanse.calibrated import ordered_selected_pvalue
    null = null_selected_index(1, 9, draws=4000, dependence=0.5)
    for z in (1.0, 3.0, 6.0):
        p, j = ordered_selected_pvalue([z], 9, draws=4000, dependence=0.5)
        assert j == 1 and p == pytest.approx((1 + len(null) - np.searchsorted(null, z, side="left")) / (len(null) + 1))


def test_the_ordered_test_is_uniform_on_its_own_null():
    # P(p <= a) <= a for simulated selected sets drawn from the null the test was calibrated on
    from netcleanse.calibrated import _label_indices, ordered_selected_pvalue
    rng = np.random.default_rng(3)
    z = _label_indices(rng, 1200, 10, 7, "t", 10.0, "qn", 2, 0.5, 3, 0.5)[:, 7:]
    ps = np.array([ordered_selected_pvalue(row, 7, signals=2, dependence=0.5, draws=4000)[0] for row in z])
    for a in (0.05, 0.2, 0.5):  # (binomial noise of 1200 models: 0.006, 0.012, 0.014)
        assert (ps <= a).mean() < a + 0.035


def test_three_transferable_targets_of_similar_size_are_found_together():
    # a 3-target development-like row: each target sits in the others' shadow for the max test, but
    # all three are far below the seven clean labels; only the ordered test sees them together
    l1 = dict(enumerate([138.0, 47.0, 76.0, 6.2, 4.2, 57.0, 114.0, 111.0, 75.0, 8.7]))
    transfer = {t: (0.2 if t in (3, 4, 9) else 0.01) for t in l1}
    one_by_one = calibrated_test(l1, transfer=transfer, transfer_threshold=0.05, transfer_ordered=False)
    together = calibrated_test(l1, transfer=transfer, transfer_threshold=0.05, transfer_ordered=True)
    assert one_by_one.flagged == []
    assert sorted(together.flagged) == [3, 4, 9] and together.reference["transfer_statistic"] == "ordered"
    assert [s["stage"] for s in together.steps[:3]] == ["transferable"] * 3
    assert len({s["p_value"] for s in together.steps[:3]}) == 1  # one test flagged the three
    assert all(together.p_values[t] <= 0.05 for t in (3, 4, 9))
    # one transferable target and two transferable clean labels of ordinary size: flagged alone
    mixed = calibrated_test({**l1, 3: 60.0, 9: 70.0}, transfer=transfer, transfer_threshold=0.05,
                            transfer_ordered=True)
    assert mixed.flagged == [4]


def test_each_labels_p_value_is_its_steps_and_never_below_the_models():
    """A label can be tested in both stages (transferable, then the others): the p-value a scan
    records and reports is its deciding step's (the step-down's), never its single-step one, and
    none is below the model's."""
    transfer = {t: (0.3 if t in (5, 8, 2) else 0.01) for t in DEV_L1}
    cases = [calibrated_test(DEV_L1, margins=DEV_MARGIN, transfer=transfer, transfer_threshold=0.05, **extra)
             for extra in ({}, {"transfer_ordered": False, "transfer_dependence": 0.5})]
    cases += [calibrated_test(DEV_L1, margins=DEV_MARGIN),
              calibrated_test({**DEV_L1, 5: 2.0, 8: 2.0}, margins=DEV_MARGIN, transfer={**transfer, 2: 0.01},
                              transfer_threshold=0.05)]
    for res in cases:
        tested = {}
        for step in res.steps:
            tested[step["label"]] = min(tested.get(step["label"], 1.0), step["p_value"])
        assert set(res.adjusted_p_values) == set(res.p_values)
        for t, p in res.adjusted_p_values.items():
            assert p >= res.p_value - 1e-12
            assert p == tested[t] if t in tested else p >= max(res.p_values[t], max(tested.values()))
            assert (p <= res.alpha) == (t in res.flagged)
    twice = cases[0]  # label 8 stopped the transferable stage, then the others' step-down tested it again
    assert [s["label"] for s in twice.steps] == [8, 8] and twice.steps[0]["p_value"] < twice.steps[1]["p_value"]
    assert twice.adjusted_p_values[8] == twice.steps[0]["p_value"] == twice.p_value
    flagged = cases[3]  # flagged in the transferable stage: its p is that step's
    assert flagged.flagged and all(flagged.adjusted_p_values[t] <= 0.05 for t in flagged.flagged)
