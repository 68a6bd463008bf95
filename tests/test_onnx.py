"""ONNX models: exported here by torch.onnx (the legacy TorchScript exporter, which runs offline) or
built with onnx.helper, converted by onnx2torch, compared with the torch module they came from."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
try:  # through netcleanse's importer: onnx2torch imports torchvision, which may not import beside this torch
    from netcleanse.onnx_io import _import_onnx2torch
    _import_onnx2torch()
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"onnx2torch is not usable here ({exc})", allow_module_level=True)

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from netcleanse import Classifier, NetcleanseError, load_model, save_model  # noqa: E402
from netcleanse.cli import main  # noqa: E402

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def small_net(seed=0, softmax=False, last=None):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
              nn.Linear(6 * 4 * 4, 10)]
    net = nn.Sequential(*layers, *([nn.Softmax(dim=1)] if softmax else []), *([last] if last else [])).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2)
    return net


def export(net, path, batch_dynamic=True, shape=(3, 8, 8)):
    kwargs = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if batch_dynamic else {}
    torch.onnx.export(net, torch.zeros((1,) + shape), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], **kwargs)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("batch_dynamic", [True, False])
def test_exported_model_matches_torch(tmp_path, batch_dynamic):
    net = small_net()
    model = load_model(export(net, tmp_path / "net.onnx", batch_dynamic))
    assert (model.input_shape, model.num_classes) == ((3, 8, 8), 10)
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(model.logits(x), net(x), atol=1e-5)


class ReshapeNet(nn.Module):
    """Flattens with x.reshape(batch, -1): exported at a fixed batch of one, the shape is a constant."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3), nn.Linear(2 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(x.shape[0], -1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fixed_batch_of_one_runs_image_by_image(tmp_path):
    torch.manual_seed(0)
    net = ReshapeNet().eval()
    model = load_model(export(net, tmp_path / "fixed.onnx", batch_dynamic=False))
    assert model.net.per_sample
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(model.logits(x), net(x), atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_final_softmax_is_stripped_and_preprocessing_applies(tmp_path, capsys):
    net = small_net(softmax=True)
    path = export(net, tmp_path / "probs.onnx")
    model = load_model(path, mean=MEAN, std=STD)
    x = torch.rand(4, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.predict_proba(x), net((x - mean) / std), atol=1e-5)
    assert not torch.allclose(model.logits(x).softmax(1), model.logits(x))  # logits, not probabilities
    # the same flags from the command line, and a checkpoint that rebuilds from the stored ONNX
    with pytest.raises(SystemExit):
        main(["info", str(path), "--mean", MEAN, "--std", STD, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["format"].startswith("ONNX") and info["mean"] == pytest.approx([0.485, 0.456, 0.406])
    back = load_model(save_model(model, tmp_path / "model.pt"))
    assert back.mean == model.mean and torch.allclose(back.logits(x), model.logits(x), atol=1e-6)
    # no Keras layout exists for onnx2torch's graph: a weights-only .h5 of it could never be read back
    with pytest.raises(NetcleanseError, match="read from ONNX has no Keras layout"):
        save_model(model, tmp_path / "model.h5")
    assert not (tmp_path / "model.h5").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("last", [nn.Sigmoid(), nn.Tanh()], ids=["sigmoid", "tanh"])
def test_a_final_sigmoid_or_tanh_is_stripped_too(tmp_path, last):
    net = small_net(last=last)
    model = load_model(export(net, tmp_path / "squashed.onnx"))
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(model.logits(x), net[:-1](x), atol=1e-5)  # the scores before it


def nhwc_model(tmp_path, external=None):
    """A hand-built NHWC graph: Transpose -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    fc = rng.normal(size=(5, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 6, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if external is not None:
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in external.items():
            tensor.external_data.add(key=key, value=value)
    path = tmp_path / "nhwc.onnx"
    onnx.save_model(model, str(path))
    return path, w, fc


def test_nhwc_graph_is_fed_transposed(tmp_path):
    path, w, fc = nhwc_model(tmp_path)
    model = load_model(path)
    assert model.input_shape == (3, 6, 6) and model.net.nhwc
    x = torch.rand(3, 3, 6, 6)
    expected = (torch.einsum("nchw,oc->nohw", x, torch.from_numpy(w[:, :, 0, 0])).mean(dim=(2, 3))
                @ torch.from_numpy(fc).t())
    assert torch.allclose(model.logits(x), expected, atol=1e-5)


@pytest.mark.parametrize("external, message", [
    ({"location": "/etc/passwd"}, "outside the model's folder"),
    ({"location": "../../../../etc/passwd"}, "outside the model's folder"),
    ({"location": "missing.bin"}, "does not exist"),
    ({"location": "weights.bin", "offset": "0", "length": "4096"}, "beyond the file's end"),
    ({"location": "link.bin"}, "leads outside the model's folder"),
])
def test_external_data_outside_the_folder_is_refused(tmp_path, capsys, external, message):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 48)
    (tmp_path / "link.bin").symlink_to("/etc/passwd")
    path, _, _ = nhwc_model(tmp_path, external)
    with pytest.raises(SystemExit) as stopped:
        main(["info", str(path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_external_data_inside_the_folder_loads(tmp_path):
    path, w, _ = nhwc_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"junk" + w.tobytes())
    ext, _, _ = nhwc_model(tmp_path, {"location": "weights.bin", "offset": "4", "length": str(w.nbytes)})
    x = torch.rand(2, 3, 6, 6)
    reference = load_model(path)  # written first, same weights inline
    assert torch.allclose(load_model(ext).logits(x), reference.logits(x), atol=1e-6)


def test_checkpoint_onnx_bytes_with_external_data_are_refused(tmp_path, monkeypatch, capsys):
    """A netcleanse checkpoint stores its ONNX graph as bytes; a graph there that keeps a tensor in an
    external file would make onnx read that file relative to the working directory. Refused, and the
    file is never read (its bytes do not reach the network)."""
    path, w, _ = nhwc_model(tmp_path)
    checkpoint = save_model(load_model(path), tmp_path / "model.pt")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "canary.bin").write_bytes(np.full(w.size, 7.25, np.float32).tobytes())
    sub = tmp_path / "sub"
    sub.mkdir()
    pointing, _, _ = nhwc_model(sub, {"location": "canary.bin"})
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["onnx_model"] = torch.frombuffer(bytearray(pointing.read_bytes()), dtype=torch.uint8).clone()
    torch.save(ckpt, tmp_path / "bad.pt")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit) as stopped:
        main(["info", str(tmp_path / "bad.pt")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "keeps its data in another file" in err


def test_bad_onnx_files_are_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07" + b"\xff" * 64)
    custom = tmp_path / "custom.onnx"
    graph = helper.make_graph([helper.make_node("Evil", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                            helper.make_opsetid("com.example", 1)]), str(custom))
    dynamic = tmp_path / "dynamic.onnx"
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "k"])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(dynamic))
    for path, fragment in [(garbage, "not a readable ONNX model"), (custom, "not standard ONNX"),
                           (dynamic, "give --input-shape")]:
        with pytest.raises(SystemExit) as stopped:
            main(["info", str(path)])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    # with the shape given, the flatten-only graph is a 48-class "classifier"
    assert load_model(dynamic, input_shape="3x4x4").num_classes == 48
    with pytest.raises(NetcleanseError, match=r"input is \?x3x\?x\?, which --input-shape 1x4x4 \(CxHxW\) does not fit"):
        load_model(dynamic, input_shape="1x4x4")  # the graph fixes 3 channels
    with pytest.raises(NetcleanseError, match="drop --arch"):
        load_model(dynamic, arch="mnist-cnn", input_shape="3x4x4")
    with pytest.raises(NetcleanseError, match="not a readable ONNX model"):  # the file's fault comes first
        load_model(garbage, arch="mnist-cnn")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_same_model_from_state_dict_safetensors_and_onnx(tmp_path):
    """The issue's "done when": one network, three files, the same flags, the same answers."""
    from safetensors.torch import save_file
    net = small_net(seed=3)
    arch = tmp_path / "arch.py"
    arch.write_text("from torch import nn\ninput_shape = (3, 8, 8)\n\ndef make():\n"
                    "    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), "
                    "nn.MaxPool2d(2), nn.Flatten(), nn.Linear(96, 10))\n")
    torch.save(net.state_dict(), tmp_path / "w.pth")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    export(net, tmp_path / "w.onnx")
    flags = {"mean": MEAN, "std": STD}
    models = [load_model(tmp_path / "w.pth", arch=f"{arch}:make", **flags),
              load_model(tmp_path / "w.safetensors", arch=f"{arch}:make", **flags),
              load_model(tmp_path / "w.onnx", **flags)]
    x = torch.rand(6, 3, 8, 8)
    outs = [m.logits(x) for m in models]
    assert all(torch.allclose(o, outs[0], atol=1e-5) for o in outs[1:])
    assert isinstance(models[2], Classifier) and models[2].input_shape == (3, 8, 8)


def dynamo_like_model(path, approximate="none", then="Identity"):
    """What torch.onnx.export's default (dynamo) exporter writes for Flatten -> Linear -> GELU ->
    Linear -> Softmax: Reshape(allowzero=1) and Gelu at opset 20 (onnx2torch 1.5 converts neither)."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.3, (16, 48)).astype(np.float32), rng.normal(0, 0.1, 16).astype(np.float32)
    w2 = rng.normal(0, 0.5, (5, 16)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array([-1, 48], dtype=np.int64), "shape"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], allowzero=1),
             helper.make_node("Gemm", ["r", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Gelu", ["h"], ["g"], approximate=approximate),
             helper.make_node("Gemm", ["g", "w2"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1),
             helper.make_node(then, ["p"], ["y"])]
    graph = helper.make_graph(nodes, "dynamo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))

    def reference(x):
        h = torch.from_numpy(x.reshape(len(x), -1).numpy() @ w1.T + b1)
        return torch.nn.functional.gelu(h, approximate=approximate) @ torch.from_numpy(w2).T
    return reference


@pytest.mark.parametrize("approximate, then", [("none", "Identity"), ("tanh", "Flatten")])
def test_default_torch_exports_reshape_allowzero_and_gelu_load(tmp_path, approximate, then):
    reference = dynamo_like_model(tmp_path / "d.onnx", approximate, then)
    model = load_model(tmp_path / "d.onnx")
    x = torch.rand(4, 3, 4, 4)
    # the softmax is left out behind the Identity / Flatten: logits, as the graph's scores before it
    assert model.num_classes == 5 and torch.allclose(model.logits(x), reference(x), atol=1e-5)


def test_old_opset_is_converted_up_and_vector_input_takes_the_image_size(tmp_path, capsys):
    """Upsample-9 (opset 9) has no onnx2torch converter; the graph converted to opset 13 has.
    An MLP on flattened images takes --input-shape and is fed x.flatten(1)."""
    w = np.random.default_rng(1).normal(0, 0.3, (4, 3 * 8 * 8)).astype(np.float32)
    nodes = [helper.make_node("Upsample", ["x", "scales"], ["u"], mode="nearest"),
             helper.make_node("Flatten", ["u"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), str(tmp_path / "old.onnx"))
    x = torch.rand(3, 3, 4, 4)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest").flatten(1) @ torch.from_numpy(w).T
    assert torch.allclose(load_model(tmp_path / "old.onnx").logits(x), expected, atol=1e-5)

    mlp = nn.Sequential(nn.Linear(28 * 28, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch.onnx.export(mlp, torch.zeros(1, 28 * 28), str(tmp_path / "mlp.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = load_model(tmp_path / "mlp.onnx", input_shape="1x28x28")
    images = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model.logits(images), mlp(images.flatten(1)), atol=1e-5)
    with pytest.raises(NetcleanseError, match="vectors of 784 values, which --input-shape 3x28x28"):
        load_model(tmp_path / "mlp.onnx", input_shape="3x28x28")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx2torch_warnings_do_not_reach_the_user(tmp_path, recwarn):
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 2, 3), nn.Linear(2 * 3 * 3, 4)

        def forward(self, x):
            return self.fc(self.conv(x)[:, :, :3, :3].flatten(1))

    torch.onnx.export(Sliced().eval(), torch.zeros(1, 3, 8, 8), str(tmp_path / "s.onnx"), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    recwarn.clear()
    load_model(tmp_path / "s.onnx").logits(torch.rand(2, 3, 8, 8))
    assert not [w for w in recwarn if "onnx2torch" in w.filename]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_graph_that_takes_uint8_pixels_is_fed_0_to_255(tmp_path):
    # a deployment export, `net(x.float() / 255)` on uint8 images: without --input-scale it is fed
    # x * 255 (it saw x / 255 before, and answered one class for everything); a given scale stays
    net = small_net()

    class Bytes(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.float() / 255)

    path = tmp_path / "u8.onnx"
    torch.onnx.export(Bytes().eval(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = load_model(path)
    assert model.input_scale == 255
    x = torch.randint(0, 256, (16, 3, 8, 8)).float() / 255
    with torch.no_grad():
        assert torch.allclose(model.logits(x), net(x), atol=1e-4)
    assert load_model(path, input_scale=2).input_scale == 2
    assert load_model(export(small_net(), tmp_path / "f.onnx")).input_scale == 1  # a float input: as given


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_graph_of_grey_images_without_a_channel_axis_loads(tmp_path):
    # N x H x W input (tf2onnx's export of Keras's Input((28, 28)), or a net that unsqueezes itself)
    torch.manual_seed(0)

    class Grey(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))

    net = Grey().eval()
    path = tmp_path / "grey.onnx"
    torch.onnx.export(net, torch.zeros(1, 8, 8), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = load_model(path)
    assert model.input_shape == (1, 8, 8)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.logits(x), net(x[:, 0]), atol=1e-5)
        again = load_model(save_model(model, tmp_path / "grey.pt"))  # the checkpoint rebuilds it from the graph
        assert torch.allclose(again.logits(x), net(x[:, 0]), atol=1e-5)
    assert load_model(path, input_shape="1x8x8").input_shape == (1, 8, 8)
    with pytest.raises(NetcleanseError, match="grey images without a channel axis"):
        load_model(path, input_shape="3x8x8")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_float16_and_float64_graphs_compute_in_float32(tmp_path):
    # deployment exports: a .half() or .double() net, and a float32 graph casting to float16 inside
    # (as onnxconverter-common writes); each is run in float32 on its exactly widened weights
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(net).half()

        def forward(self, x):
            return self.net(x.half()).float()

    x = torch.rand(4, 3, 8, 8)
    for name, module, dtype, reference in (
            ("half", copy.deepcopy(net).half(), torch.float16, copy.deepcopy(net).half().float()),
            ("double", copy.deepcopy(net).double(), torch.float64, net),
            ("casting", Casting().eval(), torch.float32, copy.deepcopy(net).half().float())):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, torch.zeros(1, 3, 8, 8, dtype=dtype), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        model = load_model(path)
        with torch.no_grad():
            assert torch.allclose(model.logits(x), reference(x), atol=1e-5), name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_graph_input_without_a_shape_takes_the_given_one(tmp_path):
    # some tools drop the input's shape: the error asks for --input-shape, and with it the model loads
    net = small_net()
    path = export(net, tmp_path / "full.onnx")
    graph = onnx.load(str(path))
    graph.graph.input[0].type.tensor_type.ClearField("shape")
    bare = tmp_path / "bare.onnx"
    onnx.save(graph, str(bare))
    with pytest.raises(NetcleanseError, match="of unknown shape, not a fixed-size image; give --input-shape"):
        load_model(bare)
    model = load_model(bare, input_shape="3x8x8")
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.logits(x), net(x), atol=1e-5)
