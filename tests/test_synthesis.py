"""Data-free input synthesis (netcleanse.synthesis): the inversion's stop at a confidence."""

from dataclasses import replace

import pytest
import torch

import netcleanse
from netcleanse.errors import NetcleanseError
from netcleanse.presets import PRESETS
from netcleanse.synthesis import inversion_parts, invert, smooth_noise, synthesize_inputs

from conftest import SIZE

pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(model, n, seed):
    t = torch.randperm(model.num_classes, generator=torch.Generator().manual_seed(seed))[:n]
    return t.repeat(-(-n // len(t)))[:n]


def test_each_input_is_kept_at_the_first_confident_step(badnet):
    x0 = smooth_noise((1, SIZE, SIZE), 40, torch.Generator().manual_seed(0))
    targets = _targets(badnet, 40, 1)
    full = invert(badnet, x0, targets, 40, steps=30)
    stopped = invert(badnet, x0, targets, 40, steps=30, confidence=0.6)
    with torch.no_grad():
        p_full = badnet(full).softmax(1)[torch.arange(40), targets]
        p_stopped = badnet(stopped).softmax(1)[torch.arange(40), targets]
    kept = p_stopped >= 0.6 - 1e-4
    # inputs that reached the confidence are kept there, not pushed on to the full run's extremes
    assert kept.sum() >= 20
    assert p_stopped[kept].mean() < p_full[kept].mean()
    assert not torch.equal(stopped, full)
    # an input that never reached it is the last iterate, as without the stop
    never = ~kept
    assert torch.allclose(stopped[never], full[never], atol=1e-5)
    # without a confidence nothing changes
    again = invert(badnet, x0, targets, 40, steps=30, confidence=None)
    assert torch.equal(again, full)


@pytest.mark.parametrize("confidence", [None, 0.6])
def test_inputs_inverted_part_by_part_end_where_they_would_together(badnet, confidence):
    # each input's loss term and Adam's update are its own: the parts a scan inverts one after
    # another (and journals, and may send to other workers) give the very bits of one optimisation
    x0, targets = smooth_noise((1, SIZE, SIZE), 40, torch.Generator().manual_seed(0)), _targets(badnet, 40, 1)
    together = invert(badnet, x0, targets, 40, steps=10, confidence=confidence, max_images=16)
    parts = inversion_parts(40, 16)
    assert parts == [(0, 16), (16, 32), (32, 40)]
    apart = torch.cat([invert(badnet, x0[lo:hi], targets[lo:hi], 40, steps=10, confidence=confidence,
                              max_images=16) for lo, hi in parts])
    assert torch.equal(apart, together)
    steps = []
    synthesize_inputs(badnet, 40, "inversion", torch.Generator().manual_seed(0), max_images=16,
                      on_step=steps.append)
    assert sum(steps) == 3 * 30  # every step of every part is told


@pytest.mark.parametrize("confidence, kind", [(0.0, "inversion"), (1.0, "inversion"), (0.9, "smooth")])
def test_a_bad_confidence_is_refused(badnet, confidence, kind):
    with pytest.raises(NetcleanseError, match="confidence"):
        synthesize_inputs(badnet, 4, kind, torch.Generator().manual_seed(0), confidence=confidence)


def test_a_scan_takes_a_preset_variant_and_records_it(badnet):
    # few labels: the few-labels confidence (when set) replaces the preset's own
    plan = replace(PRESETS["fast"], inversion_confidence=0.8, few_labels_inversion_confidence=None, n_opt=16,
                   n_val=16, few_labels_n_opt=16,
                   few_labels_refine=replace(PRESETS["fast"].few_labels_refine,
                                             schedule=replace(PRESETS["fast"].few_labels_refine.schedule,
                                                              max_epochs=2)),
                   margin_restarts=1, margin_steps=5)
    result = netcleanse.scan(badnet, data_free=True, labels=[0, 1, 2], preset=plan, progress=False)
    assert result.preset == "custom"
    assert result.settings["plan"]["inversion_confidence"] == 0.8
    result = netcleanse.scan(badnet, data_free=True, labels=[0, 1, 2], progress=False,
                             preset=replace(plan, few_labels_inversion_confidence=0.95))
    assert result.settings["plan"]["inversion_confidence"] == 0.95
    assert "inversion_confidence" not in PRESETS["fast"].to_dict()  # the presets' settings are as they were


def test_the_few_labels_plan_takes_its_own_inversion_confidence():
    fast = PRESETS["fast"]
    variant = replace(fast, few_labels_inversion_confidence=0.9)
    few, many = 10, 43
    assert variant.for_labels(few).inversion_confidence == 0.9
    assert variant.for_labels(few).refine == fast.few_labels_refine
    assert variant.for_labels(many) is variant and variant.for_labels(many).inversion_confidence is None
    assert fast.for_labels(few).inversion_confidence is None  # off in the presets (benchmarks/RESULTS.md)
    assert PRESETS["reference"].for_labels(10) is PRESETS["reference"]  # one stage: no few-labels plan


def test_a_preset_variant_is_the_name_unless_something_changes():
    from netcleanse.presets import inversion_variant, preset_variant
    assert preset_variant("fast", inversion_confidence=None) == "fast"
    changed = preset_variant("fast", inversion_confidence=0.9)
    assert changed == replace(PRESETS["fast"], inversion_confidence=0.9)
    with pytest.raises(NetcleanseError, match="unknown preset"):
        preset_variant("fastest")
    assert inversion_variant("fast", None) == "fast"
    assert inversion_variant("fast", "0.9") == replace(PRESETS["fast"], inversion_confidence=0.9,
                                                       few_labels_inversion_confidence=0.9)
    assert inversion_variant("fast", "off") == "fast"  # the preset itself never stops early
    for bad in ("high", "1.5"):
        with pytest.raises(NetcleanseError, match="inversion confidence"):
            inversion_variant("fast", bad)
