"""benchmarks/transfer_evidence.py: the transferability's own test on hand-made values, and its summary."""
import json


def test_one_label_that_transfers_far_more_than_the_others_is_flagged(benchmark_module):
    ev = benchmark_module("transfer_evidence")
    alike = {t: v for t, v in enumerate([0.03, 0.05, 0.04, 0.08, 0.02, 0.06, 0.05, 0.07, 0.03, 0.04])}
    flagged, p = ev.transferability_test(alike, 0.05, 0.2, 4000)
    assert flagged == [] and p > 0.05
    flagged, p = ev.transferability_test({**alike, 6: 0.7}, 0.05, 0.2, 4000)
    assert flagged == [6] and p <= 0.05
    # a floor on the scale only lowers indices: the same label at a wide floor is no longer flagged
    assert ev.transferability_test({**alike, 6: 0.7}, 0.05, 3.0, 4000)[0] == []
    # clean labels spread as on the zoo's clean images (0.01-0.15, a wide spread on the logit scale):
    # the same label is no longer flagged, which is what the benchmark measures
    wide = {t: v for t, v in enumerate([0.01, 0.12, 0.03, 0.15, 0.02, 0.06, 0.01, 0.09, 0.04, 0.11])}
    assert ev.transferability_test({**wide, 6: 0.7}, 0.05, 0.2, 4000)[0] == []


def _row(name, targets, l1, et, split="dev"):
    labels = [{"label": t, "mask_l1": l1[t], "max_margin": 10.0, "transferability": et[t]} for t in range(10)]
    return {"model": name, "mode": "data", "seed": 0,
            "entry": {"num_classes": 10, "backdoored": bool(targets), "attack_learned": bool(targets),
                      "clean_accuracy": 0.95, "targets": targets, "split": split},
            "scan": {"labels": labels, "settings": {"detection": {"scheme": "all labels"}}}}


def test_the_summary_counts_models_and_errors_are_one_line(benchmark_module, tmp_path, capsys):
    ev = benchmark_module("transfer_evidence")
    base = [40.0, 55.0, 48.0, 62.0, 51.0, 44.0, 58.0, 47.0, 53.0, 60.0]
    low = [0.03, 0.05, 0.04, 0.08, 0.02, 0.06, 0.05, 0.07, 0.03, 0.04]
    rows = [_row("clean", [], base, low), _row("bd", [3], [*base[:3], 2.0, *base[4:]], [*low[:3], 0.6, *low[4:]])]
    (tmp_path / "rows").mkdir()
    for r in rows:
        (tmp_path / "rows" / f"{r['model']}.json").write_text(json.dumps(r))
    assert ev.main([str(tmp_path), "--min-scale", "0.2", "--draws", "2000", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "1 clean, 1 backdoored models" in out and "AUROC of the model's largest transferability: 1.000" in out
    cell = json.loads((tmp_path / "s.json").read_text())["data/10"]
    assert cell["shipped"] == [0, 1, 1] and cell["floor 0.2"]["united"] == [0, 1, 1]
    assert ev.main([str(tmp_path), "--split", "eval"]) == 2
    assert ev.main([str(tmp_path), "--min-scale", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
