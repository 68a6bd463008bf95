"""The maximum-margin signal (netcleanse.margin): what it measures, and that a label's value does not
depend on which labels are computed with it."""

import numpy as np
import pytest
import torch
from torch import nn

from netcleanse.margin import max_margins


def _linear(num_classes: int = 6, boosted: int = 2, gain: float = 8.0) -> nn.Module:
    """A linear classifier on 1x6x6 images whose label ``boosted`` reacts ``gain`` times as strongly
    to its evidence as the other labels do: it can be driven much further above them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, num_classes))
    with torch.no_grad():
        net[1].weight.mul_(0.3)
        net[1].weight[boosted] *= gain
        net[1].bias.zero_()
    return net.eval().requires_grad_(False)


def test_a_label_the_model_answers_overwhelmingly_has_the_largest_margin():
    net = _linear()
    m = max_margins(net, range(6), (1, 6, 6), seed=0, restarts=2, steps=60, lr=0.1)
    assert m.shape == (6,) and np.all(np.isfinite(m))
    assert int(np.argmax(m)) == 2
    assert m[2] > 3 * np.median(np.delete(m, 2))


def test_the_margin_is_what_the_model_reaches_on_some_input_in_range():
    net = _linear()
    m = max_margins(net, [2], (1, 6, 6), seed=0, restarts=1, steps=80, lr=0.1)[0]
    # for a linear model the exact maximum is known: put 1 where label 2's weights beat the best rival's
    w = net[1].weight
    rivals = [j for j in range(6) if j != 2]
    best = max(float(torch.clamp(w[2] - w[j], min=0).sum()) for j in rivals)  # an upper bound on the margin
    assert 0 < m <= best + 1e-4
    assert m > 0.8 * best


def test_a_labels_margin_does_not_depend_on_the_other_labels_or_the_chunking():
    net = _linear()
    alone = max_margins(net, [4], (1, 6, 6), seed=3, restarts=2, steps=30)
    together = max_margins(net, [0, 4, 5], (1, 6, 6), seed=3, restarts=2, steps=30, max_images=2)
    assert together[1] == pytest.approx(alone[0], rel=1e-5)
    other_seed = max_margins(net, [4], (1, 6, 6), seed=4, restarts=2, steps=30)
    assert other_seed[0] != alone[0]
