"""Tests for the report (netcleanse.report, netcleanse.plots, `netcleanse report`).

The scan, lab and repair producers are other modules; these tests build their files (scan.json,
masks.npz, truth.json, repair.json, trigger.png) in code, following the formats agreed in the
project notes, with a small independent MAD computation standing in for the scan's detection.
Every assertion about the page is derived from those files, not from fixed strings.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netcleanse.calibrated import null_family
from netcleanse.errors import NetcleanseError
from netcleanse.report import VERDICT_LISTED, fmt_index, fmt_number, find_sources, mad_threshold, markdown_escape, render_report


# ----------------------------------------------------------------------------------------------
# Stand-ins for the producers' files
# ----------------------------------------------------------------------------------------------

def _anomaly_indices(l1: np.ndarray) -> np.ndarray:
    """Neural Cleanse's anomaly index, written out independently of netcleanse.report."""
    median = np.median(l1)
    mad = np.median(np.abs(l1 - median)) * 1.4826
    return np.where(l1 < median, (median - l1) / mad, 0.0)


def write_scan(directory: Path, num_labels: int, shape=(1, 28, 28), planted=(7,), *, threshold=2.0,
               name="mnist-badnet", data="data-free", seed=0) -> dict:
    """A scan directory like `netcleanse scan --out`: scan.json + masks.npz."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    typical = 0.08 * height * width  # clean labels need triggers of a few percent of the image
    l1 = rng.normal(typical, 0.12 * typical, num_labels).clip(0.3 * typical)
    masks = np.zeros((num_labels, height, width), np.float32)
    for label in range(num_labels):
        if label in planted:  # a 3x3 patch in the corner, as BadNets plants it
            masks[label, -4:-1, -4:-1] = 1.0
        else:
            blob = rng.random((height, width)) ** 4
            masks[label] = np.clip(blob * l1[label] / blob.sum(), 0, 1)
        l1[label] = masks[label].sum()
    patterns = rng.random((num_labels, channels, height, width), dtype=np.float32)
    index = _anomaly_indices(l1)
    flagged = [int(label) for label in np.flatnonzero(index > threshold)]
    records = [{"label": label, "mask_l1": float(l1[label]), "attack_success": float(rng.uniform(0.97, 1.0)),
                "anomaly_index": float(index[label]), "mask_l1_vs_median": float(l1[label] / np.median(l1)),
                "flagged": label in flagged,
                "steps": int(rng.integers(50, 400)), "time_s": float(rng.uniform(0.1, 2.0))}
               for label in range(num_labels)]
    scan = {"labels": records, "flagged": flagged, "threshold": threshold, "preset": "fast", "data": data,
            "elapsed_s": 321.5, "seed": seed,
            "model": {"name": name, "source": f"/models/{name}.h5", "arch": "mnist-cnn",
                      "num_classes": num_labels, "input_shape": list(shape), "input_scale": 1.0},
            "settings": {"preset": "fast", "lr": 0.1, "betas": [0.5, 0.9], "batch_size": 32,
                         "init_cost": 1e-3, "patience": 25, "seed": seed}}
    (directory / "scan.json").write_text(json.dumps(scan))
    np.savez(directory / "masks.npz", labels=np.arange(num_labels), masks=masks, patterns=patterns)
    return scan


def write_two_stage_scan(directory: Path, num_labels: int = 300, planted=(7,), *, rule="calibrated", alpha=0.05,
                         shape=(3, 20, 16), name="faces-badnet", seed=0, margins: dict | None = None,
                         l1: dict | None = None) -> dict:
    """A fast-preset scan of many labels as `netcleanse scan --out` records it: every label had the
    coarse pass, the 16 smallest coarse masks (candidates) and 48 random controls were refined, the
    calibrated test ran on them (the producer's own calibrated_inputs and calibrated_test).

    ``margins``: None, a scan made before the maximum margin (decided on the size alone); else the
    refined labels get a ``max_margin`` (log-normal around 5, or the value given here by label) and
    the test combines both signals, recorded as the scan records it (``log_index``,
    ``margin_index``, ``test_index``; tested_margins). ``l1``: refined labels' mask L1 by label."""
    from netcleanse.calibrated import calibrated_test
    from netcleanse.presets import PRESETS
    from netcleanse.scanning import calibrated_inputs, tested_margins
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = PRESETS["fast"].to_dict()
    coarse_steps = plan["coarse"]["schedule"]["max_epochs"] * plan["coarse"]["schedule"]["steps_per_epoch"]
    coarse = rng.normal(700, 60, num_labels).clip(400)
    for t in planted:
        coarse[t] = 250.0  # a planted target is small after the coarse pass already
    candidates = sorted(int(t) for t in np.argsort(coarse, kind="stable")[:16])
    controls = sorted(int(t) for t in rng.choice(num_labels, 48, replace=False))
    refined = set(candidates) | set(controls)
    records = []
    for t in range(num_labels):
        if t in refined:
            size = 12.0 if t in planted else float(np.exp(rng.normal(np.log(300), 0.3)))
            size = (l1 or {}).get(t, size)
            record = {"label": t, "mask_l1": size, "stage": "refine", "steps": coarse_steps + int(rng.integers(100, 300))}
            if margins is not None:
                record["max_margin"] = margins.get(t, 40.0 if t in planted else float(np.exp(rng.normal(np.log(5), 0.2))))
        else:
            record = {"label": t, "mask_l1": float(coarse[t]), "stage": "coarse", "steps": coarse_steps}
        records.append({**record, "attack_success": float(rng.uniform(0.7, 1.0)), "succeeded": True,
                        "time_s": 0.1, "cost": 0.001})
    detection = {"scheme": "random controls", "candidates": candidates, "controls": controls}
    ref_l1 = np.array([records[t]["mask_l1"] for t in controls])
    median, mad = float(np.median(ref_l1)), float(1.4826 * np.median(np.abs(ref_l1 - np.median(ref_l1))))
    detection.update(median=median, mad=mad)
    test = calibrated_test(*calibrated_inputs(records, detection), alpha=alpha,
                           margins=tested_margins(records, detection))
    index = _anomaly_indices(coarse)  # labels of the coarse pass alone: against the coarse pass's median
    mad_flagged = []
    for r in records:
        if r["label"] in refined:
            index[r["label"]] = (median - r["mask_l1"]) / mad
        if index[r["label"]] > 2.0 and r["label"] in refined:
            mad_flagged.append(r["label"])
    flagged = test.flagged if rule == "calibrated" else mad_flagged
    for r in records:
        r.update(anomaly_index=float(index[r["label"]]), p_value=test.p_values.get(r["label"]), flagged=r["label"] in flagged,
                 mask_l1_vs_median=r["mask_l1"] / median)
        if margins is None:  # as scans recorded it before the margin
            r.update(log_index=test.indices.get(r["label"]))
        else:  # as scanning.scan records it
            r.update(log_index=test.size_indices.get(r["label"]), margin_index=test.margin_indices.get(r["label"]),
                     test_index=test.indices.get(r["label"]))
    channels, height, width = shape
    masks = np.zeros((num_labels, height, width), np.float32)
    masks[:, :4, :4] = 0.5
    scan = {"format": "netcleanse-scan", "version": 1,
            "verdict": "backdoor-detected" if flagged else "none-detected", "flagged": flagged, "rule": rule,
            "alpha": alpha, "p_value": test.p_value, "threshold": 2.0, "test": test.to_dict(),
            "mad_flagged": mad_flagged, "preset": "fast", "data": "data-free", "elapsed_s": 700.0, "labels": records,
            "model": {"name": name, "arch": "csaw-deepid", "num_classes": num_labels, "input_shape": list(shape)},
            "settings": {"preset": "fast", "plan": plan, "seed": seed, "rule": rule, "alpha": alpha,
                         "detection": detection}}
    (directory / "scan.json").write_text(json.dumps(scan))
    np.savez(directory / "masks.npz", labels=np.arange(num_labels), masks=masks,
             patterns=rng.random((num_labels, channels, height, width), dtype=np.float32))
    return scan


def write_truth(directory: Path, targets=(7,), shape=(28, 28)) -> dict:
    """A BadNet-lab directory's truth.json with its trigger images."""
    directory.mkdir(parents=True, exist_ok=True)
    triggers = []
    for i, target in enumerate(targets):
        image = np.zeros((*shape, 4), np.uint8)
        image[-4:-1, -4:-1] = 255  # white, opaque patch; transparent elsewhere
        file = "trigger.png" if len(targets) == 1 else f"trigger_{i}.png"
        Image.fromarray(image, "RGBA").save(directory / file)
        triggers.append({"kind": "patch", "target": target, "mask_l1": 9.0, "image": file})
    truth = {"dataset": "mnist", "arch": "mnist-cnn", "targets": list(targets), "triggers": triggers,
             "rate": 0.1, "seed": 0, "clean_accuracy": 0.981,
             "attack_success": {str(t): 0.995 for t in targets}, "clean_model_accuracy": 0.984}
    (directory / "truth.json").write_text(json.dumps(truth))
    return truth


def write_repair(directory: Path, method="fine-prune", scan_dir: str | None = "../scan") -> dict:
    """A repair directory's repair.json: a pruning curve, the saved models' table, before/after."""
    directory.mkdir(parents=True, exist_ok=True)
    fractions = np.linspace(0, 0.95, 39)
    accuracy = 0.98 - 0.9 * np.clip(fractions - 0.7, 0, None) ** 2 * 4
    asr = np.clip(1.0 - 2.2 * np.clip(fractions - 0.5, 0, None), 0.0, 1.0)
    curve = [{"fraction_pruned": float(f), "clean_accuracy": float(a), "attack_success": float(s)}
             for f, a, s in zip(fractions, accuracy, asr)]
    table = []
    for drop in (2, 4, 10, 30):
        i = int(np.argmax(accuracy <= accuracy[0] - drop / 100)) if (accuracy <= accuracy[0] - drop / 100).any() else -1
        table.append({"drop": drop, **curve[i], "file": f"model_drop{drop}.pt"})
    repair = {"method": method, "table": table, "curve": curve, "layer": "conv_3",
              "before": {"clean_accuracy": 0.981, "attack_success": 0.995},
              "after": {"clean_accuracy": table[0]["clean_accuracy"], "attack_success": table[0]["attack_success"]},
              "settings": {"drops": [2, 4, 10, 30], "fine_tune_epochs": 0}}
    if scan_dir is not None:
        repair["scan"] = scan_dir
    (directory / "repair.json").write_text(json.dumps(repair))
    return repair


def page_text(markup: str) -> str:
    """The text a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    markup = re.sub(r"<style.*?</style>", " ", markup, flags=re.S)
    markup = re.sub(r"</?(span|strong|em|code|b|i|a)\b[^>]*>", "", markup)  # inline: no word break
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", markup)))


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_mad_threshold_matches_the_anomaly_index_definition():
    l1 = np.array([10.0, 11, 12, 13, 14, 15, 2.0])
    median, mad, at_threshold = mad_threshold(l1, 2.0)
    assert median == 12 and mad == pytest.approx(1.4826 * 2)  # |l1 - 12| = 2,1,0,1,2,3,10 -> median 2
    assert at_threshold == pytest.approx(12 - 2 * 1.4826 * 2)
    # The one label below the threshold L1 is the one whose anomaly index exceeds 2.
    assert list(np.flatnonzero(l1 < at_threshold)) == list(np.flatnonzero(_anomaly_indices(l1) > 2.0)) == [6]


def test_mad_threshold_uses_the_scans_own_statistics_when_recorded():
    # The fast preset scores labels against a control sample; the report must draw that threshold.
    l1 = np.array([10.0, 11, 12, 13, 14, 15, 2.0])
    median, mad, at_threshold = mad_threshold(l1, 2.0, {"median": 100.0, "mad": 10.0})
    assert (median, mad, at_threshold) == (100.0, 10.0, 80.0)


def test_demo_layout_report_shows_verdict_truth_and_repair(tmp_path):
    scan = write_scan(tmp_path / "scan", 10, planted=(7,), name="demo-badnet")
    write_truth(tmp_path / "badnet", targets=(7,))
    repair = write_repair(tmp_path / "repair-fine-prune")
    assert 7 in scan["flagged"], "fixture: the planted label must come out flagged"

    started = time.perf_counter()
    path = render_report(tmp_path)
    assert time.perf_counter() - started < 30
    assert path == tmp_path / "report.html"
    markup = path.read_text()
    text = page_text(markup)

    verdict = text[text.index("Backdoor detected"):text.index("Reversed-trigger size per label")]
    assert f"{len(scan['flagged'])} of {len(scan['labels'])} labels flagged" in verdict
    for label in scan["flagged"]:
        record = scan["labels"][label]
        assert f"label {label}: anomaly index {fmt_index(record['anomaly_index'])}" in verdict
        assert f"{100 * record['mask_l1_vs_median']:.1f} % of the median" in verdict
    assert "demo-badnet" in verdict and "data-free" in verdict and "5 min 22 s" in verdict
    assert "Found: 7." in verdict and "Missed" not in verdict
    before, after = repair["before"], repair["after"]
    assert (f"clean accuracy {100 * before['clean_accuracy']:.1f} % → {100 * after['clean_accuracy']:.1f} %"
            in verdict)
    assert f"attack success {100 * before['attack_success']:.1f} % → {100 * after['attack_success']:.1f} %" in verdict

    l1 = np.array([r["mask_l1"] for r in scan["labels"]])
    assert f"mask L1 < {fmt_number(mad_threshold(l1, 2.0)[2])}" in text
    # The trigger gallery: flagged label, then the 3 smallest non-flagged, real trigger beside label 7.
    gallery = text[text.index("Reversed triggers"):text.index("smallest reversed triggers")]
    quiet = sorted((r for r in scan["labels"] if not r["flagged"]), key=lambda r: r["mask_l1"])[:3]
    for r in quiet:
        assert f"label {r['label']}" in gallery
    assert len(re.findall(r'alt="reversed trigger (mask|pattern|fusion) for label', markup)) == 3 * (len(scan["flagged"]) + 3)
    assert 'alt="planted patch trigger for target 7"' in markup
    # Repair table rows and the saved plots beside the report.
    for row in repair["table"]:
        assert f"model_drop{row['drop']}.pt" in text
    for plot in ("mask_l1", "anomaly_index", "repair_curve"):
        png = tmp_path / f"report_{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Settings for reproducibility.
    assert "init_cost" in text and "conv_3" in text and "fine_tune_epochs" in text


def test_html_is_self_contained(tmp_path):
    write_scan(tmp_path / "scan", 10)
    write_truth(tmp_path / "badnet")
    write_repair(tmp_path / "repair-fine-prune")
    markup = render_report(tmp_path).read_text()
    assert "<script" not in markup.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", markup, flags=re.I)
    assert "url(" not in markup and "@import" not in markup
    sources = re.findall(r'<img [^>]*src="([^"]+)"', markup)
    assert len(sources) >= 3 + 3 * 4 + 1
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_scan_report_is_fast_and_readable(tmp_path):
    scan = write_scan(tmp_path, 1283, shape=(3, 55, 47), planted=(0, 411), name="sunglasses_bd_net",
                      data="data-free", seed=3)
    assert {0, 411} <= set(scan["flagged"])
    started = time.perf_counter()
    path = render_report(tmp_path)
    elapsed = time.perf_counter() - started
    assert elapsed < 15, f"report of 1283 labels took {elapsed:.1f} s"  # < 5 s on an idle machine
    text = page_text(path.read_text())
    assert "1283 of 1283" in text and "sunglasses_bd_net" in text
    # Random clean labels also cross the threshold here (about 2 % of a normal sample does), so the
    # verdict must list many flagged labels: each one, most anomalous first, with its index.
    assert len(scan["flagged"]) > VERDICT_LISTED
    verdict = text[text.index("Backdoor detected"):text.index("Reversed-trigger size per label")]
    assert f"{len(scan['flagged'])} of 1283 labels flagged" in verdict
    ranked = sorted(scan["flagged"], key=lambda label: -scan["labels"][label]["anomaly_index"])
    for n, label in enumerate(ranked):
        index = fmt_index(scan["labels"][label]["anomaly_index"])
        stated = f"label {label}: anomaly index {index}" if n < VERDICT_LISTED else f" {label} ({index})"
        assert stated in verdict
    # Ten smallest triggers table comes straight from scan.json.
    smallest = sorted(scan["labels"], key=lambda r: r["mask_l1"])[:10]
    table = text[text.index("smallest reversed triggers"):]
    assert all(f"{rank} {r['label']} {fmt_number(r['mask_l1'])}" in table for rank, r in enumerate(smallest, 1))


def test_clean_model_says_no_backdoor(tmp_path):
    scan = write_scan(tmp_path, 10, planted=())
    assert scan["flagged"] == []
    text = page_text(render_report(tmp_path).read_text())
    top = max(scan["labels"], key=lambda r: r["anomaly_index"])
    assert "No backdoor detected among 10 labels" in text
    assert f"most anomalous label is {top['label']} (anomaly index {fmt_index(top['anomaly_index'])})" in text
    assert "Backdoor detected" not in text


def _with_calibrated_test(directory: Path, scan: dict, alpha: float = 0.05) -> dict:
    """The scan re-decided by the calibrated rule, as `netcleanse scan` records it."""
    from netcleanse.calibrated import calibrated_test
    test = calibrated_test({r["label"]: r["mask_l1"] for r in scan["labels"]}, alpha=alpha)
    for r in scan["labels"]:
        r.update(p_value=test.p_values[r["label"]], flagged=r["label"] in test.flagged)
    scan.update(rule="calibrated", alpha=alpha, p_value=test.p_value, test=test.to_dict(), flagged=test.flagged,
                mad_flagged=scan["flagged"], verdict="backdoor-detected" if test.flagged else "none-detected")
    (directory / "scan.json").write_text(json.dumps(scan))
    return scan


def test_calibrated_verdict_shows_the_model_and_label_p_values(tmp_path):
    scan = _with_calibrated_test(tmp_path, write_scan(tmp_path, 10, planted=(7,)))
    assert scan["flagged"] == [7]
    for fmt in ("html", "md"):
        out = render_report(tmp_path, format=fmt, out=tmp_path / f"r_{fmt}.{fmt}")
        text = page_text(out.read_text()) if fmt == "html" else out.read_text()
        p = f"{scan['p_value']:.2g}"
        assert f"Model-level p-value {p}" in text.replace("*", "") and "α = 0.05" in html.unescape(text)
        assert re.search(rf"label 7\W+p-value\W+{re.escape(p)}", text)
        assert "calibrated model-level test" in text
        # the step-down table: step, label, index, labels, reference labels, p-value, decision
        step = scan["test"]["steps"][0]
        row = (f"| 1 | 7 | {fmt_index(step['index'])} | 10 | 10 | {p} | **flagged** (p ≤ 0.05) |" if fmt == "md"
               else f"1 7 {fmt_index(step['index'])} 10 10 {p} flagged (p ≤ 0.05)")
        assert row in text
        # the figure's caption states the calibrated threshold the scan recorded
        assert f"mask L1 < {fmt_number(scan['test']['reference']['threshold_l1'])}" in html.unescape(text)
    clean = tmp_path / "clean"
    scan = _with_calibrated_test(clean, write_scan(clean, 10, planted=()))
    text = page_text(render_report(clean).read_text())
    assert scan["flagged"] == [] and "No backdoor detected among 10 labels" in text
    assert f"Model-level p-value {scan['p_value']:.2g} > α = 0.05" in html.unescape(text)


def test_calibrated_report_marks_the_reference_sample(tmp_path):
    from netcleanse.calibrated import calibrated_test
    scan = write_scan(tmp_path, 120, planted=(7,))
    l1 = {r["label"]: r["mask_l1"] for r in scan["labels"]}
    controls = list(range(20, 68))
    test = calibrated_test({t: l1[t] for t in controls + [7]}, controls, n_labels=120)
    scan.update(rule="calibrated", alpha=0.05, p_value=test.p_value, test=test.to_dict(), flagged=test.flagged,
                mad_flagged=scan["flagged"])
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    text = page_text(render_report(tmp_path).read_text())
    assert test.flagged == [7] and "computed from the 48 reference labels (hollow squares)" in text
    searched = text[text.index("How each label was searched"):text.index("Reversed-trigger size per label")]
    assert "Reference labels: " + ", ".join(map(str, controls)) + "." in searched


def _figure_inputs(monkeypatch) -> dict:
    """Record what the report hands to the figures (the plotting itself still runs)."""
    from netcleanse import plots
    seen: dict = {}
    for name in ("mask_l1_figure", "decision_figure", "anomaly_index_figure", "signals_figure"):
        original = getattr(plots, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen[_name] = (args, kwargs)
            return _original(*args, **kwargs)
        monkeypatch.setattr(plots, name, spy)
    return seen


def test_figures_mark_how_each_label_was_searched(tmp_path, monkeypatch):
    scan = write_two_stage_scan(tmp_path, 300, planted=(7,))
    detection = scan["settings"]["detection"]
    controls, candidates = set(detection["controls"]), set(detection["candidates"]) - set(detection["controls"])
    assert 7 in candidates and scan["flagged"] == [7], "fixture: the planted label is a candidate and is flagged"
    seen = _figure_inputs(monkeypatch)
    text = page_text(render_report(tmp_path).read_text())

    # mask size figure: one marker per way of searching, read from scan.json's detection record
    args, _ = seen["mask_l1_figure"]
    labels, roles, names = list(args[0]), list(args[9]), args[10]
    by_role = {role: {t for t, r in zip(labels, roles) if r == role} for role in set(roles)}
    assert by_role["reference"] == controls and by_role["candidate"] == candidates
    assert by_role["untested"] == {r["label"] for r in scan["labels"] if r["stage"] == "coarse"}
    assert names["untested"].endswith(f"({300 - len(controls) - len(candidates)})")
    # the anomaly-index histogram sets the labels of the coarse pass alone apart
    args, _ = seen["anomaly_index_figure"]
    assert list(args[4]) == [t not in by_role["untested"] for t in labels]

    # the table states each group's budget, from the scan's recorded plan
    plan = scan["settings"]["plan"]
    first, second = plan["coarse"]["schedule"], plan["refine"]["schedule"]
    coarse = f"at most {first['max_epochs'] * first['steps_per_epoch']} steps of {first['batch_size']} inputs"
    refine = f"up to {second['max_epochs'] * second['steps_per_epoch']} steps of {second['batch_size']} inputs"
    searched = text[text.index("How each label was searched"):text.index("Reversed-trigger size per label")]
    coarse_only = len(by_role["untested"])
    assert f"{coarse_only} coarse pass only ({coarse})" in searched
    assert f"{len(candidates)} coarse pass ({coarse}), then {refine} more" in searched
    assert "Reference labels: " + ", ".join(map(str, sorted(controls))) + "." in searched
    # ... and so does the figure's caption, marker by marker
    caption = text[text.index("Markers show how each label was searched"):]
    assert f"small grey dot, {coarse_only} labels: coarse pass only ({coarse});" in caption
    assert f"blue triangle, {len(candidates)} labels: coarse pass ({coarse}), then {refine} more;" in caption
    assert f"hollow orange square, {len(controls)} labels: coarse pass ({coarse}), then {refine} more." in caption
    steps = sorted(r["steps"] for r in scan["labels"] if r["label"] in controls)
    assert f"{fmt_number(float(np.median(steps)))} the reference" in searched
    md = render_report(tmp_path, format="md").read_text()
    assert f"| {coarse_only} | coarse pass only ({coarse}) |" in md
    assert f"| {len(controls)} | coarse pass ({coarse}), then {refine} more | {fmt_number(float(np.median(steps)))} |" in md
    assert f"hollow orange square, {len(controls)} labels: coarse pass ({coarse}), then {refine} more." in md
    _assert_tables_are_rectangular(md)


# the null of the 300-label scans below, by the name the report gives it (netcleanse.calibrated.null_family)
T300 = f"Student-t({null_family(300)[1]:g})"


def test_decision_figure_draws_the_tests_own_inputs(tmp_path, monkeypatch):
    from netcleanse.calibrated import critical_index, log_size
    scan = write_two_stage_scan(tmp_path, 300, planted=(7, 11))
    test, detection = scan["test"], scan["settings"]["detection"]
    assert scan["flagged"] == [7, 11] and len(test["steps"]) == 3
    seen = _figure_inputs(monkeypatch)
    markup = render_report(tmp_path).read_text()
    (decision,), _ = seen["decision_figure"]
    records = {r["label"]: r for r in scan["labels"]}

    # the histogram: the controls' log-scale indices, as the scan recorded them and as the definition gives
    assert set(decision.reference) == set(detection["controls"])
    reference = test["reference"]
    for label, z in decision.reference.items():
        assert z == records[label]["log_index"]
        assert z == pytest.approx((reference["median"] - log_size(records[label]["mask_l1"])) / reference["scale"])
    assert set(decision.tested) == set(detection["candidates"]) - set(detection["controls"])
    # the null is the test's own: its (1 - alpha) point is the critical index the scan recorded
    assert decision.n_labels == 300 and decision.n_reference == 48
    assert decision.critical_index == reference["critical_index"]
    null = decision.null
    at = math.ceil((len(null) + 1) * (1 - scan["alpha"]) - 1e-9) - 1
    assert null[at] == pytest.approx(reference["critical_index"])
    # (a 300-label model's own null: null_family(300))
    assert critical_index(300, 48, scan["alpha"], *null_family(300)) == pytest.approx(reference["critical_index"])
    # each step as recorded: label, index, p-value, decision
    assert [(s["label"], s["index"], s["p_value"], s["flagged"]) for s in decision.steps] == \
        [(s["label"], s["index"], s["p_value"], s["flagged"]) for s in test["steps"]]

    # the page states the same: the step table and each flagged label's deciding p-value in the verdict
    text = page_text(markup)
    for s in test["steps"]:
        verdict = f"flagged (p ≤ {scan['alpha']:g})" if s["flagged"] else f"not flagged (p > {scan['alpha']:g}): stop"
        assert (f"{s['step']} {s['label']} {fmt_index(s['index'])} {s['n_labels']} {s['n_reference']} "
                f"{s['p_value']:.2g} {verdict}") in text
        if s["flagged"]:
            assert f"label {s['label']}: p-value {s['p_value']:.2g}" in text
    assert f"critical index {fmt_index(reference['critical_index'])}" in text
    assert f"the scale ({fmt_number(reference['scale'])}, Qn of the log sizes" in text
    assert 'alt="the calibrated test:' in markup
    md = render_report(tmp_path, format="md").read_text()
    assert "## The decision: why each label was or was not flagged" in md
    assert "](report_decision.png)" in md and (tmp_path / "report_decision.png").read_bytes()[:4] == b"\x89PNG"
    for s in test["steps"]:
        assert f"| {s['step']} | {s['label']} | {fmt_index(s['index'])} | {s['n_labels']} |" in md
    _assert_tables_are_rectangular(md)


def write_two_signal_scan(directory: Path, num_labels: int = 300, planted=(7,), **kwargs) -> tuple[dict, int, int]:
    """A two-stage scan with margins and two telling labels: ``easy``, a candidate whose trigger is
    far smaller than the reference's but whose margin is ordinary, and ``loud``, a control whose
    trigger is ordinary but whose margin is extreme. Returns (scan, easy, loud)."""
    first = write_two_stage_scan(directory, num_labels, planted=planted, margins={}, **kwargs)
    detection = first["settings"]["detection"]
    easy = next(t for t in detection["candidates"] if t not in detection["controls"] and t not in planted)
    loud = next(t for t in detection["controls"] if t not in planted)
    records = {r["label"]: r for r in first["labels"]}
    typical_l1 = float(np.median([records[t]["mask_l1"] for t in detection["controls"]]))
    typical_margin = float(np.median([records[t]["max_margin"] for t in detection["controls"]]))
    scan = write_two_stage_scan(directory, num_labels, planted=planted, **kwargs,
                                margins={easy: typical_margin, loud: 8 * typical_margin},
                                l1={easy: typical_l1 / 12, loud: typical_l1})
    return scan, easy, loud


def test_two_signal_decision_and_scatter_draw_the_tests_own_inputs(tmp_path, monkeypatch):
    from netcleanse.calibrated import MARGIN_FLOOR, critical_index, log_size, null_max_index
    scan, easy, loud = write_two_signal_scan(tmp_path / "scan", 300, planted=(7,))
    write_truth(tmp_path / "badnet", targets=(7,))
    test, detection, alpha = scan["test"], scan["settings"]["detection"], scan["alpha"]
    reference = test["reference"]
    records = {r["label"]: r for r in scan["labels"]}
    crit = reference["critical_index"]
    # the two combinations the scanning code has recorded: the sum of the two indices over sqrt 2,
    # or the larger of that and the size index (named so in test.reference.statistic)
    kind = "max" if reference["statistic"].startswith("max(") else "sum"

    def combined(size: float, margin: float) -> float:
        both = (size + margin) / math.sqrt(2)
        return max(size, both) if kind == "max" else both

    def beyond(size: float, margin: float) -> bool:  # the region the scatter shades
        return size + margin > math.sqrt(2) * crit or (kind == "max" and size > crit)
    # the fixture's point: the loud label's size is ordinary, yet it is flagged; the easy label's
    # size alone would pass the size-only test's critical index: the sum's ordinary margin keeps it
    # unflagged, the max keeps its size index
    assert records[loud]["log_index"] < 1 and loud in scan["flagged"] and 7 in scan["flagged"]
    assert records[easy]["log_index"] > critical_index(300, 48, alpha, *null_family(300))
    if kind == "sum":
        assert easy not in scan["flagged"]
    else:
        assert records[easy]["test_index"] == records[easy]["log_index"]
    seen = _figure_inputs(monkeypatch)
    markup = render_report(tmp_path).read_text()
    (decision,), _ = seen["decision_figure"]

    # the histogram and ticks show the combined index the test decided on, as recorded and by definition
    assert decision.signals == 2 and decision.index_name == "combined index" and decision.combination == kind
    assert set(decision.reference) == set(detection["controls"])
    assert set(decision.tested) == set(detection["candidates"]) - set(detection["controls"])
    for label, z in {**decision.reference, **decision.tested}.items():
        r = records[label]
        assert z == r["test_index"]
        size = (reference["median"] - log_size(r["mask_l1"])) / reference["scale"]
        margin = (math.log(max(r["max_margin"], MARGIN_FLOOR)) - reference["margin_median"]) / reference["margin_scale"]
        assert z == pytest.approx(combined(size, margin))
        assert decision.size[label] == pytest.approx(size) and decision.margin[label] == pytest.approx(margin)
    # the null is the two-signal simulation the scan's test used: its (1 - alpha) point is the recorded critical index
    assert decision.critical_index == crit
    assert np.array_equal(decision.null, null_max_index(300, 48, *null_family(300), signals=2))
    at = math.ceil((len(decision.null) + 1) * (1 - alpha) - 1e-9) - 1
    assert decision.null[at] == pytest.approx(crit)
    assert [(s["label"], s["index"], s["size_index"], s["margin_index"], s["p_value"], s["flagged"])
            for s in decision.steps] == [(s["label"], s["index"], s["size_index"], s["margin_index"], s["p_value"],
                                          s["flagged"]) for s in test["steps"]]

    # the scatter: every tested label at (size index, margin index), the flagged ones, the targets, the boundary
    (size, margin, roles, flagged, critical, combination, targets, _names), _ = seen["signals_figure"]
    tested = set(detection["candidates"]) | set(detection["controls"])
    assert set(size) == set(margin) == set(roles) == tested
    assert all(size[t] == records[t]["log_index"] and margin[t] == records[t]["margin_index"] for t in tested)
    assert {t for t, role in roles.items() if role == "reference"} == set(detection["controls"])
    assert sorted(flagged) == sorted(scan["flagged"]) and list(targets) == [7]
    assert critical == crit and combination == kind
    # the shaded region holds exactly the labels whose index passes the first step's critical index
    assert all(beyond(size[t], margin[t]) == (records[t]["test_index"] > crit) for t in tested)
    assert beyond(size[test["steps"][0]["label"]], margin[test["steps"][0]["label"]]) and beyond(size[loud], margin[loud])

    # the page says what the index is, step by step, and what the verdict assumes
    text = page_text(markup)
    for s in test["steps"]:
        verdict = f"flagged (p ≤ {alpha:g})" if s["flagged"] else f"not flagged (p > {alpha:g}): stop"
        assert (f"{s['step']} {s['label']} {fmt_index(s['size_index'])} {fmt_index(s['margin_index'])} "
                f"{fmt_index(s['index'])} {s['n_labels']} {s['n_reference']} {s['p_value']:.2g} {verdict}") in text
    assert "Size index Margin index Combined index" in text
    assert (f"label {loud}: p-value {next(s['p_value'] for s in test['steps'] if s['label'] == loud):.2g}, combined "
            f"index {fmt_index(records[loud]['test_index'])} (size index {fmt_index(records[loud]['log_index'])}, "
            f"margin index {fmt_index(records[loud]['margin_index'])}") in text
    assert f"log trigger sizes and log maximum margins vary like the test's bivariate {T300} model" in text
    assert f"flagged with probability ≤ {100 * alpha:g} % (α)" in text
    assert "MM-BD, Wang et al., IEEE S&P 2024" in text and "The verdict rests on these two per-label signals" in text
    assert f"= √2 × {fmt_index(crit)} = {fmt_index(math.sqrt(2) * crit)}" in text
    assert "rests on mask size alone" not in text and "this one per-label signal" not in text
    assert 'alt="the two signals of every tested label' in markup
    # Markdown: the same content, the scatter as a file beside it
    md = render_report(tmp_path, format="md").read_text()
    plain = md.replace("*", "")
    assert "](report_signals.png)" in md and (tmp_path / "report_signals.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Step | Label | Size index | Margin index | Combined index |" in md
    for s in test["steps"]:
        assert (f"| {s['step']} | {s['label']} | {fmt_index(s['size_index'])} | {fmt_index(s['margin_index'])} | "
                f"{fmt_index(s['index'])} | {s['n_labels']} |") in md
    assert f"log trigger sizes and log maximum margins vary like the test's bivariate {T300} model" in plain
    assert "MM-BD, Wang et al., IEEE S&P 2024" in plain
    _assert_tables_are_rectangular(md)
    assert not decision.null_disagrees and "another version of the null" not in text

    # a scan decided with another null than this simulation's: drawn as recorded, and the page says so
    scan["test"]["reference"]["critical_index"] = crit - 1.0
    (tmp_path / "scan" / "scan.json").write_text(json.dumps(scan))
    text = page_text(render_report(tmp_path).read_text())
    (decision,), _ = seen["decision_figure"]
    assert decision.critical_index == crit - 1.0 and decision.simulated_critical == pytest.approx(crit)
    assert (f"differs from this simulation's ({fmt_index(crit)}): the scan was decided with another version of the "
            "null") in text


def test_two_signal_scan_of_every_label(tmp_path, monkeypatch):
    # a scan of few labels (every label is the reference, as in the paper) with margins, as
    # scanning.scan records it: the decision and the scatter use the two-signal null of all labels
    from netcleanse.calibrated import calibrated_test, null_max_index
    from netcleanse.scanning import calibrated_inputs, tested_margins
    scan = write_scan(tmp_path / "scan", 10, planted=(7,))
    write_truth(tmp_path / "badnet", targets=(7,))
    rng = np.random.default_rng(1)
    for r in scan["labels"]:
        r["max_margin"] = 60.0 if r["label"] == 7 else float(np.exp(rng.normal(np.log(8), 0.2)))
    detection = {"scheme": "all labels"}
    test = calibrated_test(*calibrated_inputs(scan["labels"], detection), margins=tested_margins(scan["labels"], detection))
    for r in scan["labels"]:
        t = r["label"]
        r.update(log_index=test.size_indices[t], margin_index=test.margin_indices[t], test_index=test.indices[t],
                 p_value=test.p_values[t], flagged=t in test.flagged)
    scan.update(rule="calibrated", alpha=0.05, p_value=test.p_value, test=test.to_dict(), flagged=test.flagged,
                verdict="backdoor-detected" if test.flagged else "none-detected")
    scan["settings"]["detection"] = detection
    (tmp_path / "scan" / "scan.json").write_text(json.dumps(scan))
    assert scan["flagged"] == [7]
    seen = _figure_inputs(monkeypatch)
    text = page_text(render_report(tmp_path).read_text())
    (decision,), _ = seen["decision_figure"]
    assert decision.n_reference is None and set(decision.reference) == set(range(10)) and not decision.tested
    assert decision.reference == {t: test.indices[t] for t in range(10)}
    assert np.array_equal(decision.null, null_max_index(10, None, signals=2))
    assert decision.critical_index == test.reference["critical_index"]
    (size, margin, roles, flagged, critical, combination, targets, _names), _ = seen["signals_figure"]
    assert size == test.size_indices and margin == test.margin_indices and set(roles.values()) == {"reference"}
    assert flagged == [7] and list(targets) == [7] and critical == test.reference["critical_index"]
    assert combination == ("max" if test.reference["statistic"].startswith("max(") else "sum")
    # the mask-size figure's solid line: the size a label of median margin needs, as the test recorded it
    (_, _, _, _, _, _, _, _, rule_line, *_), _ = seen["mask_l1_figure"]
    assert rule_line[0] == test.reference["threshold_l1"] and "at the median margin" in rule_line[1]
    assert f"mask L1 < {fmt_number(test.reference['threshold_l1'])}" in text and "if its maximum logit margin is the reference's median" in text


def test_two_signal_scan_decided_on_the_larger_of_size_and_sum(tmp_path, monkeypatch):
    # the statistic max(z_size, (z_size + z_margin) / sqrt 2), as a scan records it when its test
    # combined the signals that way: indices, curve, scatter edge and captions follow the record
    scan, easy, loud = write_two_signal_scan(tmp_path, 300, planted=(7,))
    reference = scan["test"]["reference"]
    reference["statistic"] = "max(z_size, (z_size + z_margin) / sqrt(2)) of log mask L1 and log maximum margin"
    for r in scan["labels"]:
        if r.get("test_index") is not None:
            r["test_index"] = max(r["log_index"], (r["log_index"] + r["margin_index"]) / math.sqrt(2))
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    seen = _figure_inputs(monkeypatch)
    text = page_text(render_report(tmp_path).read_text())
    (decision,), _ = seen["decision_figure"]
    records = {r["label"]: r for r in scan["labels"]}
    assert decision.combination == "max"
    assert all(decision.reference[t] == records[t]["test_index"] for t in decision.reference)
    shown = {**decision.reference, **decision.tested}
    assert shown[easy] == records[easy]["log_index"]  # its ordinary margin: the size index decides
    # the per-label null curve is a density of the max (mass 1, none of it below the size's own left tail)
    grid = np.linspace(-8, 12, 4001)
    density = decision.label_density(grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=0.01)
    (_, _, _, _, critical, combination, _, _), _ = seen["signals_figure"]
    assert combination == "max" and critical == reference["critical_index"]
    crit = reference["critical_index"]
    assert f"right of size index = {fmt_index(crit)}" in text and "an ordinary margin never hides a small trigger" in text
    assert f"combined index max(z_size, (z_size + z_margin) / √2) of two signals" in text
    # a record without the statistic's name: told by the records themselves
    reference.pop("statistic")
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    render_report(tmp_path)
    (decision,), _ = seen["decision_figure"]
    assert decision.combination == "max"


def test_two_signal_scan_without_power_says_why(tmp_path):
    # two labels: too few to fit a reference on, whatever the signals; the page does not speak of
    # an empty mask (a margin has no ceiling)
    from netcleanse.calibrated import calibrated_test
    scan = write_scan(tmp_path, 2, planted=())
    margins = {r["label"]: 5.0 + r["label"] for r in scan["labels"]}
    test = calibrated_test({r["label"]: r["mask_l1"] for r in scan["labels"]}, margins=margins)
    assert test.inconclusive and not test.flagged
    for r in scan["labels"]:
        r.update(max_margin=margins[r["label"]], log_index=test.size_indices[r["label"]],
                 margin_index=test.margin_indices[r["label"]], test_index=test.indices[r["label"]])
    scan.update(rule="calibrated", alpha=0.05, p_value=test.p_value, test=test.to_dict(), flagged=[],
                verdict="inconclusive")
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    for fmt in ("html", "md"):
        text = page_text(render_report(tmp_path, format=fmt).read_text())
        assert "Inconclusive: no label flagged among 2" in text
        assert "The test had no power: fewer than three reference labels" in text and "empty mask" not in text


def test_size_only_scans_keep_the_size_only_figure(tmp_path, monkeypatch):
    # a scan made before margins: decided on the size alone; margins added to its records later do
    # not change what the report shows (it re-decides nothing), but the page says so
    from netcleanse.calibrated import null_max_index
    scan = write_two_stage_scan(tmp_path, 300, planted=(7,))
    seen = _figure_inputs(monkeypatch)
    before = page_text(render_report(tmp_path).read_text())
    for r in scan["labels"]:
        if r["stage"] == "refine":
            r["max_margin"] = 5.0
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    for text in (before, page_text(render_report(tmp_path).read_text())):
        assert "signals_figure" not in seen
        (decision,), _ = seen["decision_figure"]
        assert decision.signals == 1 and not decision.size and decision.rho is None
        assert np.array_equal(decision.null, null_max_index(300, 48, *null_family(300)))
        assert decision.critical_index == scan["test"]["reference"]["critical_index"]
        assert "Log-scale index" in text and "Combined index" not in text and "combined index" not in text
        assert f"provided its clean labels' log trigger sizes vary like the test's {T300} model" in text
        assert "The verdict rests on this one per-label signal, the reversed trigger's mask size" in text
    assert "records carry maximum logit margins" not in before
    assert "records carry maximum logit margins, but this scan's recorded test predates them" in text


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_verdict_states_the_guarantee_and_its_limits(tmp_path, alpha):
    write_two_stage_scan(tmp_path, 120, planted=(), alpha=alpha)
    for fmt in ("html", "md"):
        out = render_report(tmp_path, format=fmt)
        text = page_text(out.read_text()) if fmt == "html" else out.read_text().replace("*", "")
        verdict = text[text.index("Verdict" if fmt == "md" else "No backdoor detected"):text.index("How each label")]
        assert f"flagged with probability ≤ {100 * alpha:g} % (α), whatever its number of labels" in verdict
        assert "input-specific (sample-dependent) triggers are not tested for" in verdict
        assert "large or blended triggers may be missed" in verdict
    write_two_stage_scan(tmp_path / "mad", 120, planted=(7,), rule="mad")
    text = page_text(render_report(tmp_path / "mad").read_text())
    assert "bounds each label, not the model" in text and "sample-dependent" in text
    # under the paper's rule its anomaly indices are the decision; the calibrated test is shown beside it
    assert text.index("The decision (the paper's rule)") < text.index("The calibrated test (for comparison)")
    assert "The paper's rule made this scan's verdict" in text


def test_decision_figure_of_a_scan_recorded_before_qn(tmp_path, monkeypatch):
    # scans of release 0.1's first calibrated test recorded the spread as "mad" and "scale" as the
    # statistic's name, and no critical index: the figure uses the recorded spread and recomputes it
    from netcleanse.calibrated import critical_index
    scan = write_two_stage_scan(tmp_path, 200, planted=(7,))
    reference = scan["test"]["reference"]
    spread = reference.pop("scale")
    for key in ("critical_index", "threshold_l1", "statistic", "scale_estimator"):
        reference.pop(key)
    reference.update(mad=spread, scale="log mask L1", family="normal")
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    seen = _figure_inputs(monkeypatch)
    text = page_text(render_report(tmp_path).read_text())
    (decision,), _ = seen["decision_figure"]
    assert decision.scale == spread and decision.estimator == "mad" and decision.family == "normal"
    assert decision.critical_index == critical_index(200, 48, 0.05, "normal", scale="mad")
    expected = math.exp(reference["median"] - decision.critical_index * spread)
    assert f"mask L1 < {fmt_number(expected)}" in text
    assert f"the scale ({fmt_number(spread)}, MAD of the log sizes" in text and "null of one label's index, normal" in text


def test_scan_that_could_not_flag_anything_says_inconclusive(tmp_path):
    scan = write_scan(tmp_path, 10, planted=())
    # as the scan records it: even an empty mask would score 1.75 <= 2
    scan.update(verdict="inconclusive", index_ceiling=1.75)
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    top = max(scan["labels"], key=lambda r: r["anomaly_index"])
    for fmt in ("html", "md"):
        text = page_text(render_report(tmp_path, format=fmt).read_text())
        assert "Inconclusive: no label flagged among 10, but none could have been" in text
        assert f"anomaly index of only {fmt_index(1.75)}, not above the threshold 2" in text
        assert f"most anomalous label is {top['label']}" in text
        assert "No backdoor detected" not in text
    # the statistics the scan used put the threshold's L1 below zero (ceiling 40 / 25 = 1.6):
    # the page says no mask can get there instead of showing a bare negative bar
    scan["settings"] = {"detection": {"median": 40.0, "mad": 25.0}}
    scan.update(index_ceiling=1.6)
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    for fmt in ("html", "md"):
        text = render_report(tmp_path, format=fmt).read_text()
        text = page_text(text) if fmt == "html" else re.sub(r"\s+", " ", text)
        assert "mask L1 < -10 (median 40, 1.4826·MAD 25): below zero, so no mask, not even an empty one, can pass" in text
        assert "(below zero: drawn at 0, and no label can reach it)" in text
    # a threshold above zero that a label still cannot reach (its own mask is in the median and MAD)
    scan["settings"] = {"detection": {"median": 40.0, "mad": 5.0}}
    scan.update(index_ceiling=0.67)
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    text = page_text(render_report(tmp_path).read_text())
    assert "mask L1 < 30 (median 40, 1.4826·MAD 5): out of reach, since a label's own mask is in the median" in text
    # a ceiling above the threshold is an ordinary "nothing found"
    scan.pop("settings")
    scan.update(verdict="none-detected", index_ceiling=3.0)
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    text = page_text(render_report(tmp_path).read_text())
    assert "No backdoor detected among 10 labels" in text and "Inconclusive" not in text


def test_missed_target_is_reported(tmp_path):
    write_scan(tmp_path / "scan", 10, planted=(7,))
    write_truth(tmp_path / "badnet", targets=(7, 2))
    text = page_text(render_report(tmp_path).read_text())
    assert "Found: 7." in text and "Missed: 2." in text
    assert "true target, not flagged" in text  # label 2's reversed trigger is shown anyway


def test_strings_from_json_are_escaped(tmp_path):
    evil = '<script>alert("x")</script> | *bold* [link](http://example.com)'
    write_scan(tmp_path, 10, name=evil, data="/data/<img src=x onerror=alert(1)>.h5")
    markup = render_report(tmp_path).read_text()
    assert "<script" not in markup and "<img src=x" not in markup
    assert html.escape(evil, quote=False) in markup or "&lt;script&gt;" in markup
    md = render_report(tmp_path, format="md").read_text()
    assert "<script" not in md and "<img src=x" not in md
    assert "[link](http" not in md and "\\[link\\](http" in md  # brackets escaped: no link
    assert markdown_escape("a|b_c") == "a\\|b\\_c"


def test_markdown_has_the_same_content_and_its_images(tmp_path):
    scan = write_scan(tmp_path / "scan", 10, planted=(7,))
    write_truth(tmp_path / "badnet")
    repair = write_repair(tmp_path / "repair-fine-prune")
    path = render_report(tmp_path, format="md")
    assert path == tmp_path / "report.md"
    md = path.read_text()
    for label in scan["flagged"]:
        assert f"**label {label}**: anomaly index **{fmt_index(scan['labels'][label]['anomaly_index'])}**" in md
    assert "mnist-badnet" in md.replace("\\", "") and "Found: 7." in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 3 + 3 * (len(scan["flagged"]) + 3) + 1
    for link in links:
        assert (tmp_path / link).read_bytes()[:4] == b"\x89PNG"
    for row in repair["table"]:
        assert f"model\\_drop{row['drop']}.pt" in md
    _assert_tables_are_rectangular(md)


def _assert_tables_are_rectangular(md: str) -> None:
    """Every Markdown table row has as many cells as its header."""
    for block in re.split(r"\n\n+", md):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            widths = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
            assert len(widths) == 1, block


def test_rerender_reads_only_and_out_option(tmp_path):
    write_scan(tmp_path / "scan", 10)
    inputs = _digest(tmp_path / "scan")
    first = render_report(tmp_path / "scan")
    second = render_report(tmp_path / "scan", out=tmp_path / "elsewhere.html")
    after = _digest(tmp_path / "scan")
    assert {name: after[name] for name in inputs} == inputs  # scan.json, masks.npz untouched
    assert first.exists() and second == tmp_path / "elsewhere.html"
    assert (tmp_path / "elsewhere_mask_l1.png").exists()
    assert page_text(first.read_text()).split("Generated")[0] == page_text(second.read_text()).split("Generated")[0]
    # the default report is netcleanse's own and is re-rendered; a named file is replaced only with force
    assert render_report(tmp_path / "scan") == first
    (tmp_path / "mine.html").write_text("my notes")
    with pytest.raises(NetcleanseError, match="mine.html exists"):
        render_report(tmp_path / "scan", out=tmp_path / "mine.html")
    assert (tmp_path / "mine.html").read_text() == "my notes"
    with pytest.raises(NetcleanseError, match="elsewhere.html exists"):
        render_report(tmp_path / "scan", out=tmp_path / "elsewhere.html")
    (tmp_path / "other_mask_l1.png").write_bytes(b"mine")
    with pytest.raises(NetcleanseError, match="other_mask_l1.png exists"):
        render_report(tmp_path / "scan", out=tmp_path / "other.html")
    assert render_report(tmp_path / "scan", out=tmp_path / "mine.html", force=True).read_text() != "my notes"


def test_optional_inputs_missing(tmp_path):
    write_scan(tmp_path, 10)
    (tmp_path / "masks.npz").unlink()
    text = page_text(render_report(tmp_path).read_text())
    assert "masks.npz was not found" in text and "Ground truth" not in text and "Repair" not in text
    # A repair directory whose scan cannot be found still gets its own report.
    repair = write_repair(tmp_path / "alone" / "repair", scan_dir=None)
    text = page_text(render_report(tmp_path / "alone").read_text())
    assert "No scan found" in text and all(f"model_drop{row['drop']}.pt" in text for row in repair["table"])


def test_repair_directory_follows_its_scan(tmp_path):
    scan = write_scan(tmp_path / "scan", 10)
    write_repair(tmp_path / "repair", scan_dir=str(tmp_path / "scan"))
    text = page_text(render_report(tmp_path / "repair").read_text())
    assert f"{len(scan['flagged'])} of 10 labels flagged" in text and "Methods" in text


def test_a_repair_finds_its_scan_from_anywhere_and_a_mismatch_is_said(tmp_path, monkeypatch):
    from netcleanse.errors import NetcleanseWarning
    scan = write_scan(tmp_path / "scan", 10)
    write_repair(tmp_path / "repair", scan_dir="../scan")  # as repair records it: from its own folder
    monkeypatch.chdir(tmp_path / "repair")  # (not where the repair ran)
    text = page_text(render_report(tmp_path / "repair").read_text())
    assert f"{len(scan['flagged'])} of 10 labels flagged" in text
    # a repair of another scan, put beside this one, or one whose scan is gone: said, not silent
    write_scan(tmp_path / "audit", 10)
    write_repair(tmp_path / "audit" / "repair", scan_dir=str(tmp_path / "scan"))
    with pytest.warns(NetcleanseWarning, match="was made from the scan in .*scan, not from the one in"):
        render_report(tmp_path / "audit")
    write_repair(tmp_path / "lost" / "repair", scan_dir="../gone")
    with pytest.warns(NetcleanseWarning, match="names the scan ../gone, which is not found from here: the report "
                                               "shows the repair without a scan"):
        render_report(tmp_path / "lost")


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(NetcleanseError, match="no scan.json or repair.json"):
        render_report(tmp_path)
    with pytest.raises(NetcleanseError, match="is not a directory"):
        render_report(tmp_path / "absent")
    (tmp_path / "scan.json").write_text("{not json")
    with pytest.raises(NetcleanseError, match="cannot read"):
        render_report(tmp_path)
    write_scan(tmp_path, 10)
    with pytest.raises(NetcleanseError, match="unknown report format"):
        render_report(tmp_path, format="pdf")
    np.savez(tmp_path / "masks.npz", labels=np.arange(3), masks=np.zeros((3, 4, 4)))
    with pytest.raises(NetcleanseError, match="masks.npz"):
        render_report(tmp_path)
    write_scan(tmp_path / "a", 10)
    write_scan(tmp_path / "b", 10)
    (tmp_path / "scan.json").unlink()
    with pytest.raises(NetcleanseError, match="several scan.json"):
        find_sources(tmp_path)


def test_cli_report(tmp_path, capsys):
    from netcleanse.cli import main

    def main_code(argv) -> int:
        with pytest.raises(SystemExit) as done:
            main(argv)
        return done.value.code

    scan = write_scan(tmp_path / "scan", 10)
    with pytest.raises(SystemExit) as done:
        main(["report", str(tmp_path), "--format", "md", "--out", str(tmp_path / "paper.md")])
    assert done.value.code == 0
    assert str(tmp_path / "paper.md") in capsys.readouterr().out
    assert f"{len(scan['flagged'])} of 10 labels flagged" in (tmp_path / "paper.md").read_text()
    # the format follows --out's suffix; a suffix naming the other format is refused; a new name
    # without a suffix is a folder
    assert main_code(["report", str(tmp_path), "--out", str(tmp_path / "notes.md")]) == 0
    assert (tmp_path / "notes.md").read_text().lstrip().startswith("#")
    assert main_code(["report", str(tmp_path), "--format", "html", "--out", str(tmp_path / "wrong.md")]) == 2
    assert "names a Markdown file but the format asked for is html" in capsys.readouterr().err
    assert not (tmp_path / "wrong.md").exists()
    assert main_code(["report", str(tmp_path), "--format", "md", "--out", str(tmp_path / "pages")]) == 0
    assert (tmp_path / "pages" / "report.md").is_file()
    assert main_code(["report", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2  # no JSON report
    assert "a report is an .html or .md file" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit) as done:
        main(["report", str(tmp_path / "nowhere")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or \
        ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _screenshot(browser: str, page: Path, tmp_path: Path, height: int = 2000) -> Path:
    """Render ``page`` in headless Chromium; assert it rendered a non-blank 1280 x ``height`` screenshot."""
    shot = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           f"--window-size=1280,{height}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    with Image.open(shot) as image:
        assert image.size == (1280, height)
        # Not a blank page: the verdict box and plots put many distinct colours on screen.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    return shot


def test_large_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); headless rendering not checked")
    # a fast-preset scan of 1283 labels: coarse-pass labels, candidates and controls, the calibrated decision
    # with margins, as scans record them now: the decision on the combined index and the scatter of both signals
    scan = write_two_stage_scan(tmp_path / "scan", 1283, shape=(3, 55, 47), planted=(0,), name="sunglasses_bd_net",
                                margins={})
    assert scan["flagged"] == [0]
    started = time.perf_counter()
    page = render_report(tmp_path / "scan")
    assert time.perf_counter() - started < 30  # a few seconds on an idle machine
    markup = page.read_text()
    for alt in ("mask L1 norm of every label, marked by how it was searched", "the calibrated test:",
                "histogram of anomaly indices", "the two signals of every tested label"):
        assert f'alt="{alt}' in markup
    # tall enough to hold the verdict, the search table and the four figures
    _screenshot(browser, page, tmp_path, height=5200)


@pytest.mark.slow
def test_report_of_a_real_csaw_scan_renders_in_headless_chromium(tmp_path):
    csaw = Path(__file__).resolve().parents[1].parent / "shared" / "csaw"
    if not csaw.is_dir():
        pytest.skip(f"{csaw} is absent: the real CSAW-HackML BadNets are not available here")
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); headless rendering not checked")
    from netcleanse.cli import main
    out = tmp_path / "scan"
    with pytest.raises(SystemExit) as done:  # `scan` writes report.html itself at the end
        main(["scan", str(csaw / "models" / "sunglasses_bd_weights.h5"), "--arch", "csaw-deepid",
              "--data-free", "--out", str(out)])  # a full 1283-label scan: about 4 minutes
    assert done.value.code == 0
    page = out / "report.html"
    scan = json.loads((out / "scan.json").read_text())
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))
    assert "sunglasses_bd_weights" in text and "1283 of 1283" in text
    for label in scan["flagged"]:
        assert f"label {label}" in text
    _screenshot(browser, page, tmp_path)


def test_truth_images_outside_their_folder_are_not_read(tmp_path):
    write_scan(tmp_path / "scan", 10, planted=(7,))
    truth = write_truth(tmp_path / "badnet", targets=(7,))
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((28, 28, 4), 255, np.uint8), "RGBA").save(secret)
    (tmp_path / "badnet" / "link.png").symlink_to(secret)
    for image in (str(secret), "../secret.png", "link.png"):
        truth["triggers"][0]["image"] = image
        (tmp_path / "badnet" / "truth.json").write_text(json.dumps(truth))
        markup = render_report(tmp_path).read_text()
        assert 'alt="planted patch trigger for target 7"' not in markup, image
    truth["triggers"][0]["image"] = "trigger.png"  # its own folder: shown
    (tmp_path / "badnet" / "truth.json").write_text(json.dumps(truth))
    assert 'alt="planted patch trigger for target 7"' in render_report(tmp_path).read_text()


def test_calibrated_report_names_the_tests_most_anomalous_label(tmp_path):
    """A label the calibrated test did not score (a coarse-pass label of a many-label scan) may have
    the largest paper's index; the verdict names the label the test ranks first, with its p-value."""
    from netcleanse.calibrated import calibrated_test
    scan = _with_calibrated_test(tmp_path, write_scan(tmp_path, 10, planted=()))
    test = calibrated_test({r["label"]: r["mask_l1"] for r in scan["labels"]})
    for r in scan["labels"]:
        r["test_index"] = test.indices[r["label"]]
    first = max(scan["labels"], key=lambda r: r["test_index"])
    other = next(r for r in scan["labels"] if r is not first)
    other.update(test_index=None, p_value=None, anomaly_index=first["anomaly_index"] + 5)
    (tmp_path / "scan.json").write_text(json.dumps(scan))
    text = html.unescape(page_text(render_report(tmp_path).read_text()))
    assert f"most anomalous label is {first['label']} (anomaly index {fmt_index(first['anomaly_index'])}" in text
    assert f"most anomalous label is {other['label']} " not in text


def test_a_repair_tables_attack_success_per_poisoned_set_is_shown_as_percentages():
    from netcleanse.report import fmt_cell
    assert fmt_cell("attack_success_by_set", [1.0, 0.125]) == f"{fmt_cell('attack_success', 1.0)} / " \
        f"{fmt_cell('attack_success', 0.125)}"
    assert fmt_cell("attack_success_by_set_after_fine_tuning", [0.5]) == fmt_cell("attack_success", 0.5)
    assert fmt_cell("pruning_order", [3, 1]) != "300% / 100%"  # other lists stay as they are


def test_a_plot_an_earlier_render_wrote_and_this_one_has_not_is_removed(tmp_path):
    # (a repair replaced with --force by a method without a curve left the old curve beside the report)
    write_scan(tmp_path, 10, planted=(3,))
    (tmp_path / "report_repair_curve.png").write_bytes(b"an earlier render's curve")
    (tmp_path / "report_notes.png").write_bytes(b"the user's own file")
    render_report(tmp_path)
    assert (tmp_path / "report_mask_l1.png").is_file() and not (tmp_path / "report_repair_curve.png").exists()
    assert (tmp_path / "report_notes.png").read_bytes() == b"the user's own file"
