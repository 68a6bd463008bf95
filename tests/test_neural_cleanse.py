"""Direct tests of the trigger search (netcleanse.neural_cleanse) and of fine-pruning's pieces
(netcleanse.pruning), on the tiny BadNet of conftest.py."""

import pytest
import torch

from netcleanse.neural_cleanse import Schedule, attack_success, from_tanh_space, reverse_engineer, stamp, to_tanh_space
from netcleanse.pruning import mean_channel_activation, prune_channels, pruned_channels

from conftest import SIZE, TARGET

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = Schedule(batch_size=16, steps_per_epoch=2, max_epochs=6, patience=2, early_stop=False)


def test_tanh_parametrisation_round_trips():
    x = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    assert torch.allclose(from_tanh_space(to_tanh_space(x)), x, atol=1e-5)


def test_stamp_is_label_major_and_blends_by_the_mask():
    x = torch.rand(3, 1, 4, 4)
    masks = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])
    patterns = torch.full((2, 1, 4, 4), 0.25)
    out = stamp(x, masks, patterns)
    assert out.shape == (6, 1, 4, 4)
    assert torch.equal(out[:3], x)  # an empty mask leaves the inputs alone
    assert torch.all(out[3:] == 0.25)  # a full mask replaces them by the pattern


def test_a_batch_of_labels_searches_as_each_label_alone(badnet, clean_data):
    """Optimising several labels in one forward pass is an implementation detail: each label's search
    (same start, same mini-batches) gives what it gives alone, up to float rounding."""
    x = clean_data.x[:64]
    labels = [1, TARGET, 6]
    init = (torch.full((3, SIZE, SIZE), 0.1), torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    together = reverse_engineer(badnet, x, labels, SHORT, generator=torch.Generator().manual_seed(7), init=init)
    for i, t in enumerate(labels):
        alone = reverse_engineer(badnet, x, [t], SHORT, generator=torch.Generator().manual_seed(7),
                                 init=(init[0][i:i + 1], init[1][i:i + 1]))[0]
        assert together[i].label == alone.label == t
        assert together[i].epochs == alone.epochs and together[i].succeeded == alone.succeeded
        assert torch.allclose(together[i].last_mask, alone.last_mask, atol=1e-4)
        assert together[i].mask_l1 == pytest.approx(alone.mask_l1, rel=1e-3, abs=1e-3)


def test_the_planted_target_needs_the_smallest_trigger_and_it_works(badnet, clean_data):
    x = clean_data.x[:96]
    schedule = Schedule(batch_size=32, steps_per_epoch=3, max_epochs=60, patience=3, early_stop_patience=10)
    found = reverse_engineer(badnet, x, range(8), schedule, generator=torch.Generator().manual_seed(0))
    sizes = {r.label: r.mask_l1 for r in found}
    assert min(sizes, key=sizes.get) == TARGET
    target = found[TARGET]
    assert target.succeeded
    keep = clean_data.y[96:] != TARGET
    held_back = clean_data.x[96:][keep]
    assert attack_success(badnet, held_back, target.mask[None], target.pattern[None], [TARGET])[0] > 0.8


def test_pruning_zeroes_channels_and_says_which(badnet, clean_data):
    import copy
    model = copy.deepcopy(badnet)
    layer = "conv"  # layer names are those of the wrapped network (model.net)
    activation = mean_channel_activation(model, layer, clean_data)
    assert activation.shape == (8,) and torch.all(activation >= 0)
    assert pruned_channels(model, layer) == []
    quiet = activation.argsort()[:3].tolist()
    prune_channels(model, layer, quiet)
    assert pruned_channels(model, layer) == sorted(quiet)
    after = mean_channel_activation(model, layer, clean_data)
    assert torch.all(after[quiet] == 0)  # a zeroed kernel and bias: exactly 0 after the ReLU
    assert torch.allclose(after[[c for c in range(8) if c not in quiet]],
                          activation[[c for c in range(8) if c not in quiet]])
    assert pruned_channels(badnet, layer) == []  # the model it was copied from is untouched


def test_label_groups_and_inversion_chunks_change_no_bit(badnet, clean_data):
    """Memory bounds that must not change results: a search's gradients taken a few labels at a time
    (``max_images``) and attack success a few labels per pass give exactly what one pass over
    everything gives; the data-free inversion a few inputs per pass gives the same inputs up to
    float rounding (a forward pass over 7 inputs need not round as the same inputs inside a pass of
    40 do: on some CPUs the kernels differ by batch size, by about 1e-6 per pass)."""
    from netcleanse.synthesis import inversion_start, invert

    labels, x = list(range(8)), clean_data.x[:64]

    def search(max_images):
        found = reverse_engineer(badnet, x, labels, SHORT, generator=torch.Generator().manual_seed(3),
                                 max_images=max_images)
        return torch.stack([f.mask for f in found]), torch.stack([f.pattern for f in found]), [f.cost for f in found]

    whole = search(None)
    for max_images in (16, 40):
        masks, patterns, costs = search(max_images)
        assert torch.equal(masks, whole[0]) and torch.equal(patterns, whole[1]) and costs == whole[2]
    m, p = whole[0], whole[1]
    assert attack_success(badnet, x, m, p, labels, max_images=64) == attack_success(badnet, x, m, p, labels,
                                                                                     max_images=4096)
    x0, targets = inversion_start(badnet, 40, torch.Generator().manual_seed(0))
    inverted = [invert(badnet, x0, targets, 40, steps=5, max_images=k) for k in (40, 16, 7)]
    for other in inverted[1:]:
        assert torch.allclose(inverted[0], other, rtol=0, atol=1e-2)
        assert (inverted[0] - other).abs().mean() < 1e-4
