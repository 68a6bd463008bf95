"""The memory bound of a scan's gradient passes (netcleanse.passes): measured per image, set by
NETCLEANSE_PASS_MIB, and changing no result."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from netcleanse.errors import NetcleanseError
from netcleanse.passes import PASS_MIB, graph_bytes_per_image, images_per_pass
from netcleanse.scanning import scan

scan_module = importlib.import_module("netcleanse.scanning")

pytestmark = pytest.mark.usefixtures("one_thread")


def _frozen(net: nn.Module) -> nn.Module:
    return net.eval().requires_grad_(False)


def _conv_net(channels: int = 16) -> nn.Module:
    return _frozen(nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5)))


def test_the_measured_activations_grow_with_the_image_and_leave_out_the_weights():
    net = _conv_net()
    small, large = graph_bytes_per_image(net, (3, 16, 16)), graph_bytes_per_image(net, (3, 64, 64))
    # the first ReLU's output (and the second conv's input) alone: 16 channels x H x W float32 per image
    assert small >= 16 * 16 * 16 * 4
    assert 12 * small <= large <= 20 * small  # 16 times the pixels
    wide = _conv_net(channels=64)  # 16x the weights of the second conv, 4x the activations
    assert graph_bytes_per_image(wide, (3, 16, 16)) <= 5 * small


def test_the_budget_is_a_setting(monkeypatch):
    net = _conv_net()
    per_image = graph_bytes_per_image(net, (3, 128, 128))
    assert per_image > (1 << 20) // 96  # so that 1 MiB holds fewer than a search's 96 images
    monkeypatch.setenv("NETCLEANSE_PASS_MIB", "1")
    assert images_per_pass(net, (3, 128, 128)) == max(1, (1 << 20) // per_image) < 96
    monkeypatch.setenv("NETCLEANSE_PASS_MIB", "4096")
    assert images_per_pass(net, (3, 128, 128)) == (4096 << 20) // per_image
    monkeypatch.delenv("NETCLEANSE_PASS_MIB")
    assert PASS_MIB() == 2048
    monkeypatch.setenv("NETCLEANSE_PASS_MIB", "lots")
    with pytest.raises(NetcleanseError, match="NETCLEANSE_PASS_MIB must be a whole number"):
        images_per_pass(net, (3, 16, 16))


@pytest.mark.parametrize("data_free", [False, True])
def test_smaller_passes_change_no_verdict(badnet, clean_data, monkeypatch, data_free):
    """A scan whose passes hold 5 images finds what one with the default passes finds: the same flags,
    margins up to rounding, with data the same triggers up to rounding (a forward pass of 32 images
    need not round as the same images inside a pass of 160 do: ~1e-7 here); data-free the
    synthesised inputs round differently and the searches drift apart a little (mask sizes within 1 %)."""
    kwargs = dict(labels=[0, 3, 4, 5, 6], seed=2, progress=False)
    data = None if data_free else clean_data
    default = scan(badnet, data, data_free=data_free, **kwargs)
    assert default.settings["images_per_pass"] == 96
    monkeypatch.setattr(scan_module, "images_per_pass", lambda *args, **kw: 5)
    small = scan(badnet, data, data_free=data_free, **kwargs)
    assert small.settings["images_per_pass"] == 5
    assert small.flagged == default.flagged
    sizes = lambda r: np.array([rec["mask_l1"] for rec in r.labels])  # noqa: E731
    if data_free:
        assert np.allclose(sizes(small), sizes(default), rtol=0.01)
    else:
        assert np.allclose(small.masks, default.masks, rtol=0, atol=1e-5)
        # (a pattern's pixels under a near-empty mask get almost no gradient and wander; the stamp does not)
        stamp = lambda r: r.masks[:, None] * r.patterns  # noqa: E731
        assert np.allclose(stamp(small), stamp(default), rtol=0, atol=1e-4)
    margins = lambda r: np.array([rec["max_margin"] for rec in r.labels])  # noqa: E731
    assert np.allclose(margins(small), margins(default), rtol=1e-4)


def test_measuring_a_training_step_leaves_the_model_as_it_was():
    """The training-mode probe runs batch-norm and dropout in train mode; the model's mode, its
    batch-norm statistics and the random number generator must come back untouched."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    buffers = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    training = graph_bytes_per_image(net, (3, 32, 32), training=True)
    assert not net.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    # train mode saves at least the conv's input, the batch-norm's input and the dropout's mask
    assert training >= 3 * 8 * 32 * 32 * 4 // 2 and training > graph_bytes_per_image(net, (3, 32, 32)) // 2


def _train_twice(monkeypatch, budget_mib: str):
    """The same training with the default budget and with ``budget_mib``: (images per step, the largest
    batch the net saw, the trained model) for each."""
    from netcleanse.classifier import Classifier
    from netcleanse.data import Dataset
    from netcleanse.training import images_per_step, train
    gen = torch.Generator().manual_seed(3)
    data = Dataset(torch.rand(40, 3, 64, 64, generator=gen), torch.randint(0, 5, (40,), generator=gen), "random")
    runs = []
    for setting in (None, budget_mib):
        if setting is not None:
            monkeypatch.setenv("NETCLEANSE_PASS_MIB", setting)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
        model = Classifier(net, (3, 64, 64), 5)
        per_step = images_per_step(model, 16)
        seen = []
        net[0].register_forward_pre_hook(lambda module, args: seen.append(len(args[0])) if module.training else None)
        trained = train(model, data, epochs=2, batch_size=16, progress=False)
        runs.append((per_step, max(seen or [0]), trained))
    return runs


def test_a_training_step_in_parts_is_the_whole_mini_batch_step(monkeypatch):
    """Under a small NETCLEANSE_PASS_MIB a mini-batch's gradient is summed over parts that the net sees
    one at a time: the same optimiser steps up to rounding (a net without batch-norm)."""
    (whole_step, whole_seen, whole), (part_step, part_seen, parts) = _train_twice(monkeypatch, "4")
    assert whole_step == whole_seen == 16
    assert 2 < part_step < 16 and part_seen == part_step  # (the measuring pass holds 2 images)
    for a, b in zip(whole.state_dict().values(), parts.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_forward_passes_without_gradient_obey_the_budget_too(monkeypatch):
    # predict, eval and Classifier.predict: up to 512 images per pass, fewer where the budget says
    # so, the user's batch size when given; the answers are the same whatever the passes
    from netcleanse.data import Dataset
    from netcleanse.evaluate import evaluate, predict_dataset
    from netcleanse.model import Classifier

    model = Classifier(_conv_net(), (3, 32, 32), 5, name="conv")
    seen = []
    model.net.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    x = torch.rand(600, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = Dataset(x, torch.zeros(600, dtype=torch.long), source="t")
    per_image = graph_bytes_per_image(model, (3, 32, 32))
    default, _ = predict_dataset(model, data)
    assert max(seen) == 512  # (the 2-image measuring pass aside)
    monkeypatch.setenv("NETCLEANSE_PASS_MIB", "1")
    fits = (1 << 20) // per_image
    assert 1 < fits < 64
    seen.clear()
    small, _ = predict_dataset(model, data)
    assert max(seen) == fits and sum(n for n in seen if n == fits) >= 600 - fits
    assert torch.equal(small, default)
    seen.clear()
    assert torch.equal(model.predict(x), default) and max(seen) == fits
    seen.clear()
    evaluate(model, clean=data, batch_size=100)
    assert set(seen) == {100}  # the user's own batch size: nothing measured
    seen.clear()
    model.predict(x[:2])
    assert seen == [2]  # two images cost no more than themselves
    with pytest.raises(NetcleanseError, match="batch_size must be a positive integer"):
        model.predict(x, batch_size=0)
    # measured once per model (fine-pruning evaluates after every channel), not before every pass
    import netcleanse.passes as passes_module
    measured = []
    real = passes_module.graph_bytes_per_image
    monkeypatch.setattr(passes_module, "graph_bytes_per_image", lambda *a, **k: measured.append(1) or real(*a, **k))
    for _ in range(3):
        model.predict(x)
    fresh = Classifier(_conv_net(), (3, 32, 32), 5, name="other")
    fresh.predict(x)
    fresh.predict(x)
    assert measured == [1]  # the first model's size was known already; the new one measured once
