"""benchmarks/weak_targets.py: what a row says about each planted target, and the totals it prints,
on a hand-made scan (no model is trained or scanned)."""


def fake_scan():
    # 6 labels, 100-label-style detection: candidates 0, 1; controls 1, 2, 3; labels 4, 5 coarse only.
    # Planted targets 0 (flagged at step 1), 4 (never refined) and 5 (attack not learned).
    records = [{"label": t, "mask_l1": l1, "mask_l1_vs_median": l1 / 40.0, "test_index": idx, "p_value": p}
               for t, l1, idx, p in [(0, 2.0, 6.0, 0.001), (1, 30.0, 0.5, 1.0), (2, 40.0, 0.0, 1.0),
                                     (3, 50.0, -0.4, 1.0), (4, 60.0, None, None), (5, 70.0, None, None)]]
    return {"labels": records, "flagged": [0, 2], "p_value": 0.001, "verdict": "backdoor-detected",
            "settings": {"detection": {"scheme": "random controls", "candidates": [0, 1], "controls": [1, 2, 3]}},
            "test": {"steps": [{"step": 1, "label": 0, "p_value": 0.001, "flagged": True},
                               {"step": 2, "label": 2, "p_value": 0.04, "flagged": True},
                               {"step": 3, "label": 1, "p_value": 0.5, "flagged": False}],
                     "reference": {"median": 3.6888794541139363, "threshold_l1": 5.0}}}


def fake_entry():
    targets = [{"kind": "patch", "size": 3, "pattern": "white", "target": 0, "attack_success": 1.0, "learned": True},
               {"kind": "patch", "size": 10, "pattern": "random", "target": 4, "attack_success": 0.95,
                "learned": True},
               {"kind": "blend", "alpha": 0.1, "pattern": "random", "target": 5, "attack_success": 0.5,
                "learned": False}]
    return {"model": "mnist-pairs-3t_00", "dataset": "mnist-pairs", "num_classes": 6, "clean_accuracy": 0.9,
            "targets": targets}


def test_rows_say_what_the_scan_did_with_each_target(benchmark_module, tmp_path):
    wt = benchmark_module("weak_targets")
    coarse = {t: {"label": t, "mask_l1": l1} for t, l1 in enumerate([20.0, 10.0, 30.0, 40.0, 90.0, 80.0])}
    row = wt.make_row(fake_entry(), "data", 0, fake_scan(), coarse, 12.0)
    by_target = {t["target"]: t for t in row["targets"]}
    first, weak, unlearned = by_target[0], by_target[4], by_target[5]
    assert (first["candidate"], first["refined"], first["coarse_rank"], first["rank"], first["step"],
            first["flagged"]) == (True, True, 2, 1, 1, True)
    # the weak target: never refined, so never tested and never flagged
    assert (weak["candidate"], weak["refined"], weak["coarse_rank"], weak["rank"], weak["step"], weak["flagged"]) \
        == (False, False, 6, None, None, False)
    assert unlearned["learned"] is False
    assert row["other_flagged"] == [2] and row["n_refined"] == 4 and row["n_tested"] == 4
    assert abs(row["reference_median_l1"] - 40.0) < 1e-9
    # coarse L1 20, 10, 30, 40, 90, 80: median 35, MAD 1.4826 * 20; the 16th smallest does not exist: the largest
    assert abs(weak["coarse_index"] - (35 - 90) / (1.4826 * 20)) < 1e-9 and row["rank_cutoff_l1"] == 90.0

    # summary: the unlearned target is reported but not counted; the other flag is counted apart
    rows = [row, dict(row, mode="data-free", other_flagged=[])]
    totals = wt.totals(rows)
    for mode in ("data", "data-free"):
        s = totals[(mode, 6)]
        assert (s["found"], s["targets"], s["not_learned"], s["not_refined"], s["missed_refined"],
                s["models_all"], s["models"]) == (1, 2, 1, 1, 0, 0, 1)
        assert s["by_size"] == {"3px": [1, 1], "10px": [0, 1]}
    assert totals[("data", 6)]["other_flagged"] == 1 and totals[("data-free", 6)]["other_flagged"] == 0
    summary = "\n".join(wt.summary_lines(rows))
    assert "| data | 6 | 1/2 | 3px 1/1, 10px 0/1 | 0/1 | 1 / 0 | 1 | 1 | 6, -1.85 | 12 |" in summary
    table = "\n".join(wt.model_table(rows))
    assert "| 4 | 10x10 random | 95 % | no | 90 (6/6, -1.9) |" in table and "blend alpha 0.1 | 50 % (not learned)" in table

    # rows written to a folder re-print without the models or scans
    (tmp_path / "rows").mkdir()
    for r in rows:
        (tmp_path / "rows" / f"{r['model']}__{r['mode']}__seed0.json").write_text(__import__("json").dumps(r))
    assert wt.main(["--out", str(tmp_path), "--summary-only"]) == 0


def test_rank_failed_prototype_leaves_the_default_preset_unchanged():
    # the prototype's field is recorded only when set, so the default's settings and resume keys stay as they were
    import dataclasses

    import pytest

    from netcleanse.errors import NetcleanseError
    from netcleanse.scanning import PRESETS

    fast = PRESETS["fast"]
    assert fast.rank_failed == "mask" and "rank_failed" not in fast.to_dict()
    assert dataclasses.replace(fast, rank_failed="success").to_dict()["rank_failed"] == "success"
    with pytest.raises(NetcleanseError):
        dataclasses.replace(fast, rank_failed="asr")
