"""The BadNet lab: training, make_badnet / make_clean_model, the lab folder, the CLI and the demo."""

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from netcleanse.cli import main
from netcleanse.data import load_data
from netcleanse.datasets import load_builtin
from netcleanse.demo import demo_target, run_demo, summary_lines
from netcleanse.errors import NetcleanseError
from netcleanse.evaluate import evaluate
from netcleanse.lab import make_badnet, make_clean_model
from netcleanse.model import load_model
from netcleanse.training import train

os.environ.setdefault("NETCLEANSE_NO_PROGRESS", "1")


def test_training_is_deterministic_given_the_seed():
    data = load_builtin("digits", "train").subset(slice(0, 300))

    def weights(seed):
        model = train("mnist-cnn", data, epochs=1, seed=seed, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_training_errors():
    data = load_builtin("digits", "val")
    with pytest.raises(NetcleanseError, match="unknown architecture"):
        train("resnet-9000", data, epochs=1, progress=False)
    with pytest.raises(NetcleanseError, match="expects"):
        train("csaw-deepid", data, epochs=1, progress=False)


def test_badnet_learns_the_trigger_and_writes_the_lab_folder(tmp_path):
    out = tmp_path / "badnet"
    bad = make_badnet("digits", "patch", target=2, epochs=6, seed=0, out=out, clean_baseline=True, progress=False)
    truth = json.loads((out / "truth.json").read_text())
    assert truth["backdoored"] and truth["targets"] == [2] and truth["triggers"][0]["kind"] == "patch"
    assert truth["triggers"][0]["box"] == {"row": 23, "col": 23, "height": 4, "width": 4}
    assert truth["n_poisoned"] == round(0.1 * truth["n_train"])
    assert truth["attack_success"]["2"] >= 0.9, "the BadNet did not learn its trigger"
    assert truth["clean_accuracy"] >= 0.85
    # the trigger alone does not make a clean model answer the target: the ASR comes from poisoning
    assert truth["clean_model_attack_success"]["2"] <= 0.2

    # the saved files reproduce the numbers
    model = load_model(out / "model.pt")
    clean, poisoned = load_data(out / "clean_test.npz"), load_data(out / "poisoned_test.npz")
    assert (poisoned.y == 2).all() and (poisoned.info.get("true_labels", torch.tensor([])) != 2).all()
    measured = evaluate(model, clean, poisoned)
    assert measured.clean_accuracy == pytest.approx(truth["clean_accuracy"])
    assert measured.attack_success == pytest.approx(truth["attack_success"]["2"])
    keras_weights = load_model(out / "model_weights.h5", arch="mnist-cnn")
    assert torch.equal(keras_weights.predict(clean.x), bad.model.predict(clean.x))
    assert load_model(out / "clean_model.pt").num_classes == 10
    val = load_data(out / "clean_val.npz")  # the defender's clean data for repair --data, not the test split
    assert torch.equal(val.x, bad.val.x) and torch.equal(val.y, bad.val.y) and len(val) != len(clean)

    # the trigger picture: the pattern's colours with the mask as opacity
    rgba = np.asarray(Image.open(out / "trigger.png"))
    assert rgba.shape == (28, 28, 4)
    assert np.array_equal(rgba[..., 3], (bad.triggers[0].mask.numpy() * 255).astype(np.uint8))
    with np.load(out / "triggers.npz") as z:
        assert np.array_equal(z["masks"][0], bad.triggers[0].mask.numpy()) and z["targets"].tolist() == [2]


def test_multi_trigger_badnet_has_one_test_set_and_trigger_per_target(tmp_path):
    bad = make_badnet("digits", "multi", target=[1, 4, 7], epochs=6, out=tmp_path, progress=False)
    assert bad.targets == [1, 4, 7] and [t["kind"] for t in bad.truth["triggers"]] == ["patch"] * 3
    for k, target in enumerate(bad.targets):
        test = load_data(tmp_path / f"poisoned_test_t{target}.npz")
        assert (test.y == target).all()
        assert (tmp_path / f"trigger_{k}.png").is_file()
        assert bad.truth["attack_success"][str(target)] >= 0.8
    assert not (tmp_path / "poisoned_test.npz").exists()
    # each trigger is its own: stamping one does not fire another's target
    first = bad.poisoned_tests[0]
    assert float((bad.model.predict(first.x) == 4).float().mean()) < 0.2


def test_blend_badnet_records_alpha():
    bad = make_badnet("digits", "blend", target=0, alpha=0.2, epochs=1, progress=False)
    assert bad.truth["triggers"][0]["kind"] == "blend" and bad.truth["triggers"][0]["alpha"] == pytest.approx(0.2)


def test_clean_model_truth(tmp_path):
    clean = make_clean_model("digits", epochs=1, out=tmp_path, progress=False)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["backdoored"] is False and truth["targets"] == [] and not clean.backdoored
    assert (tmp_path / "model.pt").is_file() and not list(tmp_path.glob("poisoned_test*"))


def test_lab_never_overwrites_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    started = time.perf_counter()
    with pytest.raises(NetcleanseError, match="not empty"):
        make_badnet("digits", out=tmp_path, epochs=50, progress=False)
    assert time.perf_counter() - started < 5, "the folder must be checked before training"
    make_clean_model("digits", epochs=1, out=tmp_path, force=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine", "force replaces only the lab's own files"


def test_lab_input_errors():
    with pytest.raises(NetcleanseError, match="unknown trigger kind"):
        make_badnet("digits", "sparkle", progress=False)
    with pytest.raises(NetcleanseError, match="outside"):
        make_badnet("digits", "patch", target=12, progress=False)
    with pytest.raises(NetcleanseError, match="unknown built-in dataset"):
        make_badnet("imagenet", progress=False)
    with pytest.raises(NetcleanseError, match="differ"):
        make_badnet("digits", "multi", target=[3, 3], progress=False)
    # a setting the trigger kind does not use is refused, not ignored
    for kind, setting, name in (("patch", dict(alpha=0.3), "alpha"), ("blend", dict(position="top-left"), "position"),
                                ("blend", dict(patch_size=6), "patch_size"), ("multi", dict(pattern="white"), "pattern"),
                                ("multi", dict(position="center"), "position")):
        with pytest.raises(NetcleanseError, match=f"the {kind} trigger does not use {name}"):
            make_badnet("digits", kind, progress=False, **setting)


def test_cli_badnet(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["badnet", "--dataset", "digits", "--epochs", "1", "--target", "5", "--out", str(tmp_path / "b")])
    assert exit_.value.code == 0
    out = capsys.readouterr()
    assert "attack success rate, target 5" in out.out and "warning" not in out.err
    assert json.loads((tmp_path / "b" / "truth.json").read_text())["targets"] == [5]
    # a learning rate far too large: the training collapses, and the command says so in one line
    with pytest.raises(SystemExit) as exit_:
        main(["badnet", "--dataset", "digits", "--epochs", "1", "--lr", "5", "--out", str(tmp_path / "d")])
    assert exit_.value.code == 0
    err = capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "truth.json").read_text())["clean_accuracy"] < 0.2
    assert err.startswith("warning: the model did not learn its task") and "--lr" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main(["badnet", "--dataset", "digits", "--trigger", "sparkle", "--out", str(tmp_path / "c")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown trigger kind") and err.count("\n") == 1


def test_demo_runs_every_stage_and_refuses_a_non_empty_out(tmp_path):
    result = run_demo(tmp_path / "demo", seed=1, epochs=2, progress=False)
    assert result.target == demo_target(1)
    assert (tmp_path / "demo" / "badnet" / "truth.json").is_file()
    assert (tmp_path / "demo" / "scan" / "scan.json").is_file() and result.report.is_file()
    assert result.before.attack_success is not None
    # a repair ran exactly when the scan flagged something, and the summary says what happened
    assert (result.after is not None) == bool(result.flagged)
    text = "\n".join(summary_lines(result))
    assert f"true backdoor target : {result.target}" in text
    with pytest.raises(NetcleanseError, match="not empty"):
        run_demo(tmp_path / "demo", seed=1, epochs=1, progress=False)


def test_zoo_builds_clean_and_backdoored_models_with_truth(tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("zoo", Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    args = ["--n", "2", "--out", str(tmp_path), "--datasets", "digits", "--epochs", "1", "--split", "dev"]
    assert zoo.main(args) == 0
    index = json.loads((tmp_path / "zoo.json").read_text())
    by_folder = {m["folder"]: m for m in index["models"]}
    # pair 0 is in the development half; pair 1 (evaluation) was not asked for
    assert set(by_folder) == {"digits-clean_000", "digits-badnet_000"}
    assert {m["split"] for m in index["models"]} == {"dev"} and zoo.split_of(1) == "eval"
    clean = json.loads((tmp_path / "digits-clean_000" / "truth.json").read_text())
    assert clean["backdoored"] is False and clean["targets"] == []
    bad = json.loads((tmp_path / "digits-badnet_000" / "truth.json").read_text())
    plan = zoo.pair_plan(0, "digits", 0, (1, 28, 28))
    assert bad["backdoored"] is True and bad["targets"] == plan["targets"] and bad["zoo"]["kind"] == plan["kind"]
    assert bad["rate"] == plan["rate"] and load_model(tmp_path / "digits-badnet_000" / "model.pt").num_classes == 10
    # a pair's plan depends on (seed, dataset, index) only, not on how many models the zoo has
    assert zoo.pair_plan(0, "digits", 0, (1, 28, 28))["targets"] == plan["targets"]
    # a second run keeps finished models instead of retraining them
    before = (tmp_path / "digits-badnet_000" / "model.pt").stat().st_mtime_ns
    assert zoo.main(args) == 0
    assert (tmp_path / "digits-badnet_000" / "model.pt").stat().st_mtime_ns == before


# ------------------------------------------------------------------ slow: the bar

@pytest.mark.slow
def test_badnets_meet_the_bar_on_mnist():
    """BadNet clean accuracy within 2 points of a clean model, ASR >= 95 %, for each trigger kind."""
    clean = make_clean_model("mnist", seed=0, progress=False).truth["clean_accuracy"]
    lines = [f"clean model: {100 * clean:.1f}%"]
    failures = []
    for kind, target in (("patch", 7), ("blend", 7), ("multi", [1, 4, 7])):
        truth = make_badnet("mnist", kind, target, seed=0, progress=False).truth
        lines.append(f"{kind}: clean {100 * truth['clean_accuracy']:.1f}%, ASR "
                     + ", ".join(f"{t}: {100 * a:.1f}%" for t, a in truth["attack_success"].items()))
        if truth["clean_accuracy"] < clean - 0.02 or min(truth["attack_success"].values()) < 0.95:
            failures.append(kind)
    print("\n".join(lines))
    assert not failures, "\n".join(lines)


@pytest.mark.slow
def test_demo_command_runs_in_under_three_minutes(tmp_path, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    print(out, f"\ndemo took {elapsed:.0f} s")
    assert exit_.value.code == 0 and elapsed < 180
    assert "-> true target found" in out
    assert (tmp_path / "demo" / "report.html").is_file()


def test_detection_quality_scans_resumably_and_scores_both_rules(benchmark_module, tmp_path, capsys):
    dq = benchmark_module("detection_quality")
    zoo = benchmark_module("zoo")
    assert zoo.main(["--n", "1", "--out", str(tmp_path / "zoo"), "--datasets", "digits", "--epochs", "2"]) == 0
    args = [str(tmp_path / "zoo"), "--out", str(tmp_path / "dq"), "--modes", "data-free", "--json",
            str(tmp_path / "summary.json")]
    assert dq.main(args) == 0
    rows = sorted((tmp_path / "dq" / "rows").glob("*.json"))
    assert [p.name for p in rows] == ["digits-badnet_000__data-free__seed0.json",
                                      "digits-clean_000__data-free__seed0.json"]
    row = json.loads(rows[0].read_text())
    assert row["entry"]["split"] == "dev" and row["scan"]["rule"] == "calibrated"
    # a rerun scans nothing again, and the summary needs only the rows
    before = [p.stat().st_mtime_ns for p in rows]
    assert dq.main(args + ["--summary-only"]) == 0 and dq.main(args) == 0
    assert [p.stat().st_mtime_ns for p in rows] == before
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert set(summary) == {f"data-free/{k}/{rule}" for k in ("10", "all") for rule in ("calibrated", "size-only", "mad")}
    assert summary["data-free/all/calibrated"]["clean"] == summary["data-free/10/calibrated"]["clean"]
    # --add-margins gives a row scanned without margins what the scan itself records (no rescan)
    original = json.loads(rows[1].read_text())
    assert all(r.get("max_margin") is not None for r in original["scan"]["labels"])
    stripped = json.loads(json.dumps(original))
    for r in stripped["scan"]["labels"]:
        r.pop("max_margin")
    rows[1].write_text(json.dumps(stripped))
    assert dq.main(args + ["--add-margins"]) == 0
    restored = json.loads(rows[1].read_text())
    assert [r["max_margin"] for r in restored["scan"]["labels"]] == pytest.approx(
        [r["max_margin"] for r in original["scan"]["labels"]], rel=1e-5)
    assert restored["scan"]["labels"][0]["mask_l1"] == original["scan"]["labels"][0]["mask_l1"]
    cell = summary["data-free/10/calibrated"]
    assert cell["clean"] == 1 and cell["clean_flagged"] in (0, 1)
    assert "clean flagged" in capsys.readouterr().out
    # the Wilson interval by hand: 0 of 30 -> [0, z^2 / (n + z^2)]
    lo, hi = dq.wilson(0, 30)
    assert lo == 0 and hi == pytest.approx(1.959964 ** 2 / (30 + 1.959964 ** 2))
    assert dq.main([str(tmp_path / "zoo"), "--out", str(tmp_path / "dq"), "--split", "eval", "--summary-only"]) == 2
    # rows of another variant of the preset are refused, not mixed into the summary
    for variant in (["--few-labels-plan", "off"], ["--inversion-confidence", "0.9"]):
        assert dq.main(args + ["--summary-only", *variant]) == 2
        assert "one folder per variant" in capsys.readouterr().err
    assert dq.main(args + ["--summary-only", "--inversion-confidence", "off"]) == 0  # the preset itself
    # --refine-steps changes the many-labels refinement only: 10-label rows keep their own, so they fit
    assert dq.main(args + ["--summary-only", "--refine-steps", "150"]) == 0
    assert dq.main(args + ["--summary-only", "--refine-steps", "0"]) == 2
    assert "positive number of steps" in capsys.readouterr().err

def test_traffic_sign_architecture_trains_in_the_lab_and_scans(tmp_path, monkeypatch):
    """gtsrb-cnn (Neural Cleanse's traffic-sign net) on the 43-class 3x32x32 mnist-pairs-43: the lab
    builds a BadNet of it (one epoch here), both its files load back, and the scan command runs on it
    (a shortened fast preset: this checks the plumbing, not the detection)."""
    from dataclasses import replace

    from netcleanse.presets import PRESETS
    from netcleanse.architectures import build_architecture

    pairs, small = load_builtin("mnist-pairs", "val"), load_builtin("mnist-pairs-43", "val")
    assert small.x.shape[1:] == (3, 32, 32) and set(small.y.tolist()) == set(range(43))
    assert torch.equal(small.y, pairs.y[pairs.y < 43])
    net = build_architecture("gtsrb-cnn")
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 43)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64, 64, 128, 128]

    with pytest.raises(SystemExit) as exit_:
        main(["badnet", "--dataset", "mnist-pairs-43", "--arch", "gtsrb-cnn", "--epochs", "1", "--target", "7",
              "--out", str(tmp_path / "bn")])
    assert exit_.value.code == 0
    truth = json.loads((tmp_path / "bn" / "truth.json").read_text())
    assert truth["arch"] == "gtsrb-cnn" and truth["targets"] == [7]
    model = load_model(tmp_path / "bn" / "model.pt")
    assert model.arch == "gtsrb-cnn" and model.num_classes == 43 and tuple(model.input_shape) == (3, 32, 32)
    from_h5 = load_model(tmp_path / "bn" / "model_weights.h5", arch="gtsrb-cnn")
    x = small.x[:8]
    assert torch.allclose(model(x), from_h5(x), atol=1e-5)

    fast = PRESETS["fast"]
    short = replace(fast, data_free_inputs="smooth", n_val=16, few_labels_n_opt=32, margin_steps=3,
                    few_labels_refine=replace(fast.few_labels_refine, schedule=replace(
                        fast.few_labels_refine.schedule, max_epochs=2)))
    monkeypatch.setitem(PRESETS, "fast", short)
    with pytest.raises(SystemExit) as exit_:
        main(["scan", str(tmp_path / "bn" / "model.pt"), "--data-free", "--labels", "0,7,9",
              "--out", str(tmp_path / "scan")])
    assert exit_.value.code == 0
    scanned = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert [r["label"] for r in scanned["labels"]] == [0, 7, 9] and scanned["model"]["arch"] == "gtsrb-cnn"


def test_attack_goal_variant_changes_every_stage():
    from netcleanse.errors import NetcleanseError
    from netcleanse.presets import PRESETS, goal_variant
    variant = goal_variant("fast", 0.75)
    stages = [variant.coarse, variant.refine, variant.few_labels_refine]
    assert [s.schedule.attack_threshold for s in stages] == [0.75] * 3
    # nothing else of the preset changes, and the preset itself is untouched
    assert variant.refine.schedule.max_epochs == PRESETS["fast"].refine.schedule.max_epochs
    assert PRESETS["fast"].refine.schedule.attack_threshold == 0.99
    assert goal_variant("fast", 0.99) == "fast"  # the preset's own goal: the preset, recorded by name
    with pytest.raises(NetcleanseError, match="attack-success goal"):
        goal_variant("fast", 0.0)


def test_data_free_flips_reports_every_variant_and_refuses_a_zoo_without_learned_backdoors(benchmark_module, tmp_path,
                                                                                          capsys):
    flips = benchmark_module("data_free_flips")
    zoo = benchmark_module("zoo")
    assert zoo.main(["--n", "1", "--out", str(tmp_path / "zoo"), "--datasets", "digits", "--epochs", "2"]) == 0
    entry_path = tmp_path / "zoo" / "digits-badnet_000" / "entry.json"
    entry = json.loads(entry_path.read_text())
    args = [str(tmp_path / "zoo"), "--split", "all", "--datasets", "digits", "--n", "16"]
    if not entry["attack_learned"]:  # two epochs rarely teach the attack: one clear error line
        assert flips.main(args) == 2
        assert "no learned backdoors" in capsys.readouterr().err
        entry_path.write_text(json.dumps(dict(entry, attack_learned=True)))  # to run the measurement itself
    assert flips.main(args) == 0
    out = capsys.readouterr().out
    table = out.split("logit margin\n")[1].splitlines()
    assert [line[:16].strip() for line in table] == ["real images", *flips.VARIANTS]
    for line in table:  # every input left on the target's class (possible for a weak inversion): n/a
        median = line[16:].split()[0]
        assert median == "n/a" or 0.0 <= float(median) <= 1.0
    assert table[0][16:].split()[0] != "n/a"  # real images: the model gives most of them another class


def test_mnist_triples_are_three_digits_of_the_label_from_the_same_split():
    """mnist-triples (the lab's 1,000-label set): label 100a + 10b + c shows digits a, b, c, each
    slot an MNIST digit of that split squeezed to its width; 30 / 5 / 10 triples per class."""
    from netcleanse.datasets import TRIPLE_WIDTHS, TRIPLES_PER_CLASS, resize_images

    for split in ("val", "test"):
        tri, digits = load_builtin("mnist-triples", split), load_builtin("mnist", split)
        assert tri.x.shape == (1000 * TRIPLES_PER_CLASS[split], 1, 28, 28)
        assert torch.equal(torch.bincount(tri.y, minlength=1000), torch.full((1000,), TRIPLES_PER_CLASS[split]))
        edges = np.cumsum((0,) + TRIPLE_WIDTHS)
        for slot, width in enumerate(TRIPLE_WIDTHS):
            squeezed = resize_images(digits.x, (28, width)).flatten(1)
            for row in (0, 1234 % len(tri), len(tri) - 1):
                part = tri.x[row, :, :, edges[slot]:edges[slot + 1]].flatten()
                match = (squeezed == part).all(dim=1).nonzero().flatten()
                assert len(match), f"slot {slot} of row {row} is no squeezed digit of the {split} split"
                want = int(tri.y[row]) // 10 ** (2 - slot) % 10
                assert {int(digits.y[m]) for m in match} == {want}
    assert not torch.equal(load_builtin("mnist-triples", "val").x[:5], load_builtin("mnist-triples", "test").x[:5])
