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
