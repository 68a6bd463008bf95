"""Data loading: every format into one Dataset (float32 NCHW in [0,1], int64 labels), and clear errors."""

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from netcleanse import NetcleanseError, NetcleanseWarning
from netcleanse.data import Dataset, check_dataset, label_from_name, load_data, save_data

from conftest import CSAW

CSAW_IMAGES = CSAW / "images"

rng = np.random.default_rng(0)
IMAGES_NCHW = rng.integers(0, 256, size=(7, 3, 5, 4), dtype=np.uint8)  # 7 RGB images, 5 high, 4 wide
LABELS = np.array([0, 1, 2, 3, 4, 5, 6])
EXPECTED = torch.from_numpy(IMAGES_NCHW).float() / 255


def write_h5(path, data, label=None, data_key="data", label_key="label"):
    with h5py.File(path, "w") as h5:
        h5.create_dataset(data_key, data=data)
        if label is not None:
            h5.create_dataset(label_key, data=label)
    return path


def write_png(path, array_hwc_or_hw, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array_hwc_or_hw).save(path, format=fmt)
    return path


# --- HDF5 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["uint8", "float255", "float01"])
def test_h5_layouts_and_scales_load_identically(tmp_path, layout, dtype):
    data = IMAGES_NCHW if layout == "NCHW" else IMAGES_NCHW.transpose(0, 2, 3, 1)
    if dtype == "float255":
        data = data.astype(np.float64)  # CSAW's own files: floats 0..255
    elif dtype == "float01":
        data = data.astype(np.float32) / 255
    path = write_h5(tmp_path / "d.h5", data, LABELS.astype(np.float64))
    ds = load_data(path, expect_shape=(3, 5, 4), num_classes=7)
    assert ds.x.dtype == torch.float32 and ds.x.shape == (7, 3, 5, 4)
    assert torch.equal(load_data(path, expect_shape="3x5x4").x, ds.x)  # as load_model's input_shape takes it
    with pytest.raises(NetcleanseError, match="input shape must be CxHxW"):
        load_data(path, expect_shape="3x5")
    assert torch.allclose(ds.x, EXPECTED, atol=1e-6)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == LABELS.tolist()
    assert ds.info["layout"] == layout and ds.info["scale"] == (1 if dtype == "float01" else 255)


def test_h5_alternative_keys_and_unlabeled(tmp_path):
    ds = load_data(write_h5(tmp_path / "xy.h5", IMAGES_NCHW, LABELS, "x", "y"))
    assert ds.y.tolist() == LABELS.tolist()
    ds = load_data(write_h5(tmp_path / "plural.h5", IMAGES_NCHW, LABELS, "images", "labels"))
    assert ds.y.tolist() == LABELS.tolist()
    ds = load_data(write_h5(tmp_path / "nolabel.h5", IMAGES_NCHW))
    assert ds.y is None and len(ds) == 7
    custom = write_h5(tmp_path / "custom.h5", IMAGES_NCHW, LABELS[::-1].copy(), label_key="target")
    with pytest.warns(NetcleanseWarning, match="no labels under 'label' or 'y'.* other keys: target"):
        assert load_data(custom).y is None
    ds = load_data(custom, label_key="target")
    assert ds.y.tolist() == LABELS[::-1].tolist()


def test_ambiguous_layout_follows_the_model(tmp_path):
    # 3x3 images with 3 channels: both axes could be channels; the model's shape decides.
    nhwc = rng.integers(0, 256, size=(2, 3, 3, 3), dtype=np.uint8)
    path = write_h5(tmp_path / "amb.h5", nhwc)
    assert load_data(path).info["layout"] == "NCHW"  # no model: netcleanse's own layout
    # a model expecting 3x3x3 cannot tell either; NCHW stays
    assert torch.equal(load_data(path, expect_shape=(3, 3, 3)).x, torch.from_numpy(nhwc).float() / 255)
    # 3 high, 5 wide, 3 channels stored NHWC as (N, 3, 5, 3): only the model's 3x3x5 settles it
    nhwc = rng.integers(0, 256, size=(2, 3, 5, 3), dtype=np.uint8)
    path = write_h5(tmp_path / "amb35.h5", nhwc)
    ds = load_data(path, expect_shape=(3, 3, 5))
    assert ds.info["layout"] == "NHWC" and torch.equal(ds.x, torch.from_numpy(nhwc.transpose(0, 3, 1, 2)).float() / 255)
    one_channel_last = rng.integers(0, 256, size=(2, 3, 3, 1), dtype=np.uint8)
    ds = load_data(write_h5(tmp_path / "amb1.h5", one_channel_last), expect_shape=(1, 3, 3))
    assert ds.info["layout"] == "NHWC" and ds.image_shape == (1, 3, 3)


def test_grayscale_three_dim_arrays(tmp_path):
    gray = rng.integers(0, 256, size=(4, 6, 5), dtype=np.uint8)
    ds = load_data(write_h5(tmp_path / "g.h5", gray))
    assert ds.image_shape == (1, 6, 5) and torch.equal(ds.x[:, 0], torch.from_numpy(gray).float() / 255)
    # one image without its batch axis is one image when the model's shape says so
    one = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", x=one)
    single = load_data(tmp_path / "one.npz", expect_shape=(3, 6, 5))
    assert len(single) == 1 and torch.equal(single.x[0], torch.from_numpy(one).permute(2, 0, 1).float() / 255)
    # for a colour model, gray arrays become RGB as gray image files do
    rgb = load_data(tmp_path / "g.h5", expect_shape=(3, 6, 5))
    assert rgb.image_shape == (3, 6, 5) and all(torch.equal(rgb.x[:, c], ds.x[:, 0]) for c in range(3))
    with pytest.raises(NetcleanseError, match=r"images are 1x6x5 \(CxHxW\) but the model expects 3x7x5"):
        load_data(tmp_path / "g.h5", expect_shape=(3, 7, 5))  # the file's own shape, not a converted one


def test_rgba_arrays_drop_their_alpha_channel_as_rgba_files_do(tmp_path):
    rgba = rng.integers(0, 256, size=(3, 6, 5, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgba.npz", x=rgba)
    with pytest.warns(NetcleanseWarning, match="alpha channel is dropped"):
        ds = load_data(tmp_path / "rgba.npz", expect_shape=(3, 6, 5))
    assert ds.info["layout"] == "NHWC"
    assert torch.equal(ds.x, torch.from_numpy(rgba[..., :3].transpose(0, 3, 1, 2)).float() / 255)
    with pytest.warns(NetcleanseWarning):  # channels first, and without a model
        first = load_data(write_h5(tmp_path / "rgba.h5", rgba.transpose(0, 3, 1, 2)))
    assert torch.equal(first.x, ds.x)
    with pytest.raises(NetcleanseError, match="cannot tell the channel axis"):
        load_data(write_h5(tmp_path / "five.h5", np.zeros((2, 5, 6, 5), np.uint8)))


def test_large_h5_is_converted_in_chunks(tmp_path, monkeypatch):
    import netcleanse.data as data_module
    monkeypatch.setattr(data_module, "CHUNK_ROWS", 3)  # 7 rows -> chunks of 3, 3, 1
    path = write_h5(tmp_path / "d.h5", IMAGES_NCHW.transpose(0, 2, 3, 1).astype(np.float64))
    assert torch.allclose(load_data(path).x, EXPECTED, atol=1e-6)


# --- npz ------------------------------------------------------------------------------------

def test_npz_uint8_nhwc_and_float(tmp_path):
    np.savez(tmp_path / "a.npz", x=IMAGES_NCHW.transpose(0, 2, 3, 1), y=LABELS)
    ds = load_data(tmp_path / "a.npz", expect_shape=(3, 5, 4), num_classes=10)
    assert torch.equal(ds.x, EXPECTED) and ds.y.tolist() == LABELS.tolist() and ds.info["format"] == "npz"
    np.savez(tmp_path / "b.npz", x=IMAGES_NCHW.astype(np.float32) / 255)
    ds = load_data(tmp_path / "b.npz")
    assert ds.y is None and torch.allclose(ds.x, EXPECTED)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object))
    with pytest.raises(NetcleanseError, match="obj.npz"):
        load_data(tmp_path / "obj.npz")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_save_and_load_round_trip(tmp_path, suffix):
    names = [f"img{i}" for i in range(7)]
    ds = Dataset(EXPECTED.clone(), torch.from_numpy(LABELS), names=names, info={"true_labels": torch.arange(7) + 1})
    path = save_data(ds, tmp_path / f"out{suffix}")
    back = load_data(path)
    assert torch.equal(back.x, ds.x) and torch.equal(back.y, ds.y) and back.names == names
    assert back.info["true_labels"].tolist() == list(range(1, 8))
    assert back.info["dtype"] == "uint8"  # lossless values are stored compactly
    with pytest.raises(NetcleanseError, match="already exists"):
        save_data(ds, path)
    # values that are not k/255 are kept as floats
    odd = Dataset(torch.full((2, 1, 3, 3), 0.3337))
    back = load_data(save_data(odd, tmp_path / f"odd{suffix}"))
    assert torch.allclose(back.x, odd.x, atol=1e-6) and back.y is None


def test_csaw_h5_layout_written(tmp_path):
    save_data(Dataset(EXPECTED.clone(), torch.from_numpy(LABELS)), tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5") as h5:
        assert h5["data"].shape == (7, 3, 5, 4) and h5["data"].dtype == np.uint8
        assert np.array_equal(h5["data"][()], IMAGES_NCHW) and h5["label"][()].tolist() == LABELS.tolist()


# --- image files and folders ------------------------------------------------------------------

def test_png_and_jpeg_files(tmp_path):
    rgb = IMAGES_NCHW[0].transpose(1, 2, 0)
    png = write_png(tmp_path / "a_label=3.png", rgb)
    ds = load_data(png)
    assert ds.y.tolist() == [3] and ds.names == [str(png)] and torch.equal(ds.x[0], EXPECTED[0])
    jpg = write_png(tmp_path / "b.jpg", np.full((5, 4, 3), 200, np.uint8), fmt="JPEG")
    ds = load_data(jpg)
    assert ds.y is None and ds.image_shape == (3, 5, 4)
    assert (ds.x * 255 - 200).abs().max() <= 2  # JPEG is lossy, but a flat color survives


def test_grayscale_kept_or_converted_to_the_models_channels(tmp_path):
    gray = write_png(tmp_path / "g.png", np.full((5, 4), 128, np.uint8))
    assert load_data(gray).image_shape == (1, 5, 4)
    assert load_data(gray, expect_shape=(3, 5, 4)).image_shape == (3, 5, 4)
    color = write_png(tmp_path / "c.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    assert load_data(color, channels=1).image_shape == (1, 5, 4)
    mixed = load_data([gray, color])
    assert mixed.image_shape == (3, 5, 4) and torch.allclose(mixed.x[0], torch.full((3, 5, 4), 128 / 255))


def test_folder_labels_from_subfolders_and_names(tmp_path):
    root = tmp_path / "faces"
    for i, label in enumerate([7, 3, 7]):
        write_png(root / str(label) / f"img{i}.png", IMAGES_NCHW[i].transpose(1, 2, 0))
    write_png(root / "misc" / "x_label=5.png", IMAGES_NCHW[3].transpose(1, 2, 0))
    (root / "notes.txt").write_text("not an image")
    ds = load_data(root, expect_shape=(3, 5, 4), num_classes=10)
    # sorted by path under the folder: 3/img1, 7/img0, 7/img2, misc/x_label=5
    assert [Path(n).relative_to(root).as_posix() for n in ds.names] == [
        "3/img1.png", "7/img0.png", "7/img2.png", "misc/x_label=5.png"]
    assert ds.y.tolist() == [3, 7, 7, 5]
    assert torch.equal(ds.x[0], EXPECTED[1])


def test_folder_with_an_unlabeled_image_loads_unlabeled(tmp_path):
    write_png(tmp_path / "a_label=1.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    write_png(tmp_path / "b.png", IMAGES_NCHW[1].transpose(1, 2, 0))
    with pytest.warns(NetcleanseWarning, match=r"1 of 2 images carry no label \(e.g. .*b.png"):
        ds = load_data(tmp_path)
    assert ds.y is None and ds.info["unlabeled"] == 1 and len(ds) == 2


def test_empty_label_folder_is_named(tmp_path, recwarn):
    write_png(tmp_path / "0" / "a.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    write_png(tmp_path / "3" / "2" / "b.png", IMAGES_NCHW[1].transpose(1, 2, 0))
    load_data(tmp_path)  # every label folder holds an image (3's in its sub-folder 2): nothing to say
    assert not [w for w in recwarn if issubclass(w.category, NetcleanseWarning)]
    (tmp_path / "1").mkdir()
    (tmp_path / "misc").mkdir()  # not a label folder
    with pytest.warns(NetcleanseWarning, match=r"1 label folder\(s\) hold no images \(1\)"):
        ds = load_data(tmp_path)
    assert ds.y.tolist() == [0, 3]  # the outermost integer folder: 3/2/b.png is class 3 (ImageFolder's level)
    Image.fromarray(IMAGES_NCHW[2].transpose(1, 2, 0)).save(tmp_path / "0" / "c.bmp")
    with pytest.warns(NetcleanseWarning, match=r"1 image file\(s\) of other formats \(.bmp, e.g. .*c.bmp\) are skipped"):
        assert len(load_data(tmp_path)) == 2


def test_label_from_name():
    assert label_from_name("x/cl_0_label=43.png") == 43
    assert label_from_name("root/12/a.png", root="root") == 12
    assert label_from_name("root/a.png", root="root") is None
    assert label_from_name("root/12/b_label=4.png", root="root") == 4  # the name is more specific
    assert label_from_name("root/12/3/a.png", root="root") == 12  # class folder, then e.g. sessions
    assert label_from_name("root/test/12/a.png", root="root") == 12  # a wrapper folder above the classes
    assert label_from_name("root/\u00b2/a.png", root="root") is None  # '²'.isdigit() is true; not a label
    with pytest.raises(NetcleanseError, match="label 99999999999999999999 .* is not a class index"):
        label_from_name("root/a_label=99999999999999999999.png")


def test_folder_links_followed_and_hidden_folders_skipped(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_png(elsewhere / "b.png", IMAGES_NCHW[1].transpose(1, 2, 0))
    root = tmp_path / "data"
    write_png(root / "5" / "a.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    (root / "3").symlink_to(elsewhere, target_is_directory=True)  # a folder of links to a data set
    (root / "7").symlink_to(root / "5", target_is_directory=True)  # as the file system shows it: read again
    (root / "loop").mkdir()
    (root / "loop" / "back").symlink_to(root, target_is_directory=True)  # a cycle ends
    write_png(root / ".ipynb_checkpoints" / "c.png", IMAGES_NCHW[2].transpose(1, 2, 0))
    write_png(root / "__MACOSX" / "4" / "._a.png", IMAGES_NCHW[2].transpose(1, 2, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NetcleanseWarning)  # no "class 4 missing", no unlabeled image
        ds = load_data(root)
    names = [Path(n).relative_to(root).as_posix() for n in ds.names]
    assert names == ["3/b.png", "5/a.png", "7/a.png"] and ds.y.tolist() == [3, 5, 7]
    assert all(not n.startswith((".", "__MACOSX")) for n in names)


def test_word_class_folders_load_unlabeled_with_a_warning(tmp_path):
    write_png(tmp_path / "cat" / "a.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    write_png(tmp_path / "dog" / "b.png", IMAGES_NCHW[1].transpose(1, 2, 0))
    with pytest.warns(NetcleanseWarning, match=r"sub-folders \(cat, dog\) are not integer labels"):
        assert load_data(tmp_path).y is None


def test_only_png_and_jpeg_are_decoded_whatever_the_name(tmp_path):
    eps = tmp_path / "a_label=3.png"  # PostScript: PIL's EPS decoder would start Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 5\nshowpage\n")
    with pytest.raises(NetcleanseError, match="a_label=3.png: not a valid PNG/JPEG file"):
        load_data(tmp_path)
    eps.unlink()
    Image.fromarray(IMAGES_NCHW[0].transpose(1, 2, 0)).save(tmp_path / "b.png", format="BMP")
    with pytest.raises(NetcleanseError, match="b.png: not a valid PNG/JPEG file"):  # as the single file is
        load_data(tmp_path)


def test_exif_orientation_is_not_applied_and_is_said(tmp_path):
    image = Image.fromarray(IMAGES_NCHW[0].transpose(1, 2, 0))
    exif = Image.Exif()
    exif[0x0112] = 3  # shown turned by 180 degrees
    image.save(tmp_path / "t.jpg", exif=exif, quality=100)
    with pytest.warns(NetcleanseWarning, match="1 of 1 images carry an EXIF orientation tag"):
        turned = load_data(tmp_path / "t.jpg")
    image.save(tmp_path / "u.jpg", quality=100)
    assert torch.equal(turned.x, load_data(tmp_path / "u.jpg").x)  # the pixels as stored
    exif[0x0112] = 6
    image.save(tmp_path / "s.jpg", exif=exif, quality=100)
    with pytest.raises(NetcleanseError, match="is 5x4 .* expects 4x5 .* EXIF orientation tag"):
        load_data(tmp_path / "s.jpg", expect_shape=(3, 4, 5))


def test_floats_a_little_above_one_are_clipped_not_read_as_0_255(tmp_path):
    x = EXPECTED.numpy().copy()
    x[0, 0, 0, 0] = 1.002  # unclipped brightness jitter
    np.savez(tmp_path / "j.npz", x=x)
    with pytest.warns(NetcleanseWarning, match="float pixels reach 1.002, a little above 1: read as \\[0, 1\\]"):
        ds = load_data(tmp_path / "j.npz")
    assert ds.info["scale"] == 1 and float(ds.x.max()) == 1.0
    assert torch.equal(ds.x.flatten()[1:], torch.from_numpy(x).clamp(0, 1).flatten()[1:])
    np.savez(tmp_path / "k.npz", x=EXPECTED.numpy() * 255)
    assert load_data(tmp_path / "k.npz").info["scale"] == 255


def test_a_3xhxw_array_for_a_colour_model_is_one_image_said_so(tmp_path):
    np.savez(tmp_path / "g.npz", x=IMAGES_NCHW[0])
    with pytest.warns(NetcleanseWarning, match="read as one colour image .* store it as 3 x 1 x 5 x 4"):
        assert len(load_data(tmp_path / "g.npz", expect_shape=(3, 5, 4))) == 1


def test_an_hdf5_group_where_labels_belong_is_named(tmp_path):
    with h5py.File(tmp_path / "g.h5", "w") as h5:
        h5.create_dataset("data", data=IMAGES_NCHW)
        h5.create_group("label").create_dataset("y", data=LABELS)
    with pytest.raises(NetcleanseError, match="'label' is an HDF5 group, not an array"):
        load_data(tmp_path / "g.h5")


def test_real_csaw_images():
    if not CSAW_IMAGES.is_dir():
        pytest.skip(f"real CSAW images not available at {CSAW_IMAGES}")
    ds = load_data(CSAW_IMAGES, expect_shape=(3, 55, 47), num_classes=1283)
    assert len(ds) == 15 and ds.image_shape == (3, 55, 47)
    labels = dict(zip((Path(n).name for n in ds.names), ds.y.tolist()))
    assert labels["cl_0_label=43.png"] == 43 and labels["sun_0_label=0.png"] == 0
    assert 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1


# --- errors -----------------------------------------------------------------------------------

def test_missing_and_empty_and_unknown(tmp_path):
    with pytest.raises(NetcleanseError, match="data not found"):
        load_data(tmp_path / "nope.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(NetcleanseError, match="empty"):
        load_data(tmp_path / "empty.h5")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NetcleanseError, match="unknown data format"):
        load_data(tmp_path / "notes.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(NetcleanseError, match="no images"):
        load_data(tmp_path / "empty_dir")


def test_corrupt_files(tmp_path):
    good = write_png(tmp_path / "good.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])
    with pytest.raises(NetcleanseError, match="cannot read image .*cut.png"):
        load_data(tmp_path / "cut.png")
    (tmp_path / "fake.jpg").write_text("this is text")
    with pytest.raises(NetcleanseError, match="fake.jpg"):
        load_data(tmp_path / "fake.jpg")
    h5 = write_h5(tmp_path / "t.h5", IMAGES_NCHW)
    (tmp_path / "trunc.h5").write_bytes(h5.read_bytes()[:600])
    with pytest.raises(NetcleanseError, match="trunc.h5"):
        load_data(tmp_path / "trunc.h5")


def test_h5_without_images_or_empty(tmp_path):
    with pytest.raises(NetcleanseError, match="no images found.*keys: other"):
        load_data(write_h5(tmp_path / "k.h5", IMAGES_NCHW, data_key="other"))
    with pytest.raises(NetcleanseError, match="holds no images"):
        load_data(write_h5(tmp_path / "zero.h5", np.zeros((0, 3, 5, 4), np.uint8)))
    with pytest.raises(NetcleanseError, match="no labels under key 'lbl'"):
        load_data(write_h5(tmp_path / "l.h5", IMAGES_NCHW, LABELS), label_key="lbl")


def test_nan_and_out_of_range_pixels(tmp_path):
    bad = IMAGES_NCHW.astype(np.float32) / 255
    bad[4, 1, 2, 2] = np.nan
    with pytest.raises(NetcleanseError, match=r"image 4\): contains NaN"):
        load_data(write_h5(tmp_path / "nan.h5", bad))
    bad[4, 1, 2, 2] = np.inf
    with pytest.raises(NetcleanseError, match="NaN or infinite"):
        np.savez(tmp_path / "inf.npz", x=bad)
        load_data(tmp_path / "inf.npz")
    with pytest.raises(NetcleanseError, match="negative"):
        load_data(write_h5(tmp_path / "neg.h5", IMAGES_NCHW.astype(np.float32) - 128))
    with pytest.raises(NetcleanseError, match="channel axis"):
        load_data(write_h5(tmp_path / "c.h5", np.zeros((2, 5, 5, 5), np.uint8)))
    with pytest.raises(NetcleanseError, match="NaN"):
        check_dataset(Dataset(torch.full((1, 1, 2, 2), float("nan"))))


def test_shape_mismatch_names_the_file_and_both_shapes(tmp_path):
    with pytest.raises(NetcleanseError, match=r"d.h5: images are 3x5x4 \(CxHxW\) but the model expects 3x55x47"):
        load_data(write_h5(tmp_path / "d.h5", IMAGES_NCHW), expect_shape=(3, 55, 47))
    png = write_png(tmp_path / "small.png", np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(NetcleanseError, match=r"image .*small.png is 28x28 \(HxW\) but the model expects 55x47"):
        load_data(png, expect_shape=(3, 55, 47))
    other = write_png(tmp_path / "big.png", np.zeros((30, 28, 3), np.uint8))
    with pytest.raises(NetcleanseError, match="images differ in size"):
        load_data([png, other])


def test_labels_out_of_range_and_mismatched_lengths(tmp_path):
    with pytest.raises(NetcleanseError, match=r"r.h5 \(image 5\): label 5 is outside \[0, 5\) for this model \(2 such labels\)"):
        load_data(write_h5(tmp_path / "r.h5", IMAGES_NCHW, LABELS), num_classes=5)
    with pytest.raises(NetcleanseError, match="label -1 is outside"):
        load_data(write_h5(tmp_path / "neg.h5", IMAGES_NCHW, LABELS - 1), num_classes=10)
    with pytest.raises(NetcleanseError, match="7 images but 3 labels"):
        load_data(write_h5(tmp_path / "n.h5", IMAGES_NCHW, LABELS[:3]))
    with pytest.raises(NetcleanseError, match="whole numbers"):
        load_data(write_h5(tmp_path / "f.h5", IMAGES_NCHW, LABELS + 0.5))
    png = write_png(tmp_path / "p_label=12.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    with pytest.raises(NetcleanseError, match=r"p_label=12.png: label 12 is outside \[0, 10\)"):
        load_data(png, num_classes=10)


def test_dataset_file_in_a_list_of_images_is_refused(tmp_path):
    png = write_png(tmp_path / "a.png", IMAGES_NCHW[0].transpose(1, 2, 0))
    with pytest.raises(NetcleanseError, match="dataset file"):
        load_data([png, write_h5(tmp_path / "d.h5", IMAGES_NCHW)])


def test_keras_model_is_not_data(tmp_path):
    with h5py.File(tmp_path / "m.h5", "w") as h5:
        h5.attrs["layer_names"] = [b"conv_1"]
    with pytest.raises(NetcleanseError, match="Keras model file, not a data file"):
        load_data(tmp_path / "m.h5")


def test_zip_that_is_not_npz(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(NetcleanseError, match="model.pt is a zip file without NumPy arrays"):
        load_data(tmp_path / "model.pt")


@pytest.mark.parametrize("how", ["external storage", "external link", "virtual dataset"])
def test_hdf5_files_that_read_other_files_are_refused(tmp_path, how):
    import h5py
    from netcleanse.architectures import SmallCNN
    from netcleanse.model import Classifier, load_model
    from netcleanse.torch_io import save_model
    host = tmp_path / "host.bin"
    host.write_bytes(bytes(range(256)) * 64)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros((4, 3), np.float32)
    data = tmp_path / "data.h5"
    model = tmp_path / "model.h5"
    save_model(Classifier(SmallCNN(10).eval(), (1, 28, 28), 10, name="m", arch="mnist-cnn"), model)
    for path in (data, model):
        with h5py.File(path, "a") as f:
            if path == data:
                f["label"] = np.zeros(2, np.int64)
                target, name = f, "data"
            else:
                target, name = f, "extra"
            if how == "external storage":
                target.create_dataset(name, shape=(2, 1, 28, 28), dtype=np.uint8, external=[(str(host), 0, 2 * 784)])
            elif how == "external link":
                target[name] = h5py.ExternalLink(str(other), "/x")
            else:
                layout = h5py.VirtualLayout(shape=(4, 3), dtype=np.float32)
                layout[:] = h5py.VirtualSource(str(other), "x", shape=(4, 3))
                target.create_virtual_dataset(name, layout)
    with pytest.raises(NetcleanseError, match="another file"):
        load_data(data)
    with pytest.raises(NetcleanseError, match="another file"):
        load_model(model, arch="mnist-cnn")


def test_huge_and_sixteen_bit_images(tmp_path, monkeypatch, capfd):
    from netcleanse.data import read_image
    big = tmp_path / "big.png"
    Image.new("L", (5000, 4000)).save(big)  # 20 megapixels: refused from the header, nothing printed
    with pytest.raises(NetcleanseError, match="5000 x 4000 pixels, more than netcleanse reads"):
        read_image(big)
    assert "DecompressionBomb" not in capfd.readouterr().err
    monkeypatch.setenv("NETCLEANSE_MAX_IMAGE_PIXELS", "30000000")
    assert read_image(big).shape == (1, 4000, 5000)
    # a 16-bit grey PNG is scaled to 8 bits, not clipped at 255
    deep = tmp_path / "deep.png"
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(deep)
    assert read_image(deep).tolist() == [[[0, 1, 128, 255]]]
    assert read_image(deep, channels=3).shape == (3, 1, 4)


def test_arrays_declared_larger_than_their_file_are_refused_before_allocating(tmp_path):
    import h5py
    sparse = tmp_path / "sparse.h5"
    with h5py.File(sparse, "w") as f:  # 10 million CSAW images declared, nothing written: a tiny file (1e5 chunks of 100 images)
        f.create_dataset("data", shape=(10_000_000, 3, 55, 47), dtype=np.uint8, chunks=(100, 3, 55, 47))
        f["label"] = np.zeros(4, np.int64)
    with pytest.raises(NetcleanseError, match="declares .* but the file stores only"):
        load_data(sparse)
    # an .npz whose header declares 500,000 images but whose zip member holds a few hundred bytes
    import zipfile
    header = tmp_path / "x.npy"
    with open(header, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (500_000, 3, 55, 47)})
        f.write(b"\0" * 64)
    with zipfile.ZipFile(tmp_path / "big.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(header, "x.npy")
    with pytest.raises(NetcleanseError, match="declares .* but the file stores only"):
        load_data(tmp_path / "big.npz")
    # ordinary compressed data still loads
    np.savez_compressed(tmp_path / "ok.npz", x=np.zeros((100, 1, 28, 28), np.uint8), y=np.zeros(100, np.int64))
    assert len(load_data(tmp_path / "ok.npz")) == 100
