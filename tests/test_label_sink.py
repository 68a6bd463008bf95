"""benchmarks/label_sink.py: the per-label statistics on hand-made logits, and its summary table."""
import numpy as np
import torch


def test_a_label_every_input_leans_towards_scores_highest(benchmark_module):
    sink = benchmark_module("label_sink")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 40, generator=g)
    logits[:, 7] += 1.5  # label 7 pulls every input a little, without winning most of them
    assert (logits.argmax(1) == 7).float().mean() < 0.5
    stats = sink.sink_statistics(logits)
    for name in sink.STATISTICS:
        z = sink.robust_z(stats[name])
        assert int(np.argmax(z)) == 7 and z[7] > 4, name
    # top-k is K-Arm's top quarter: a label never in any input's top quarter has frequency 0
    logits[:, 3] -= 100
    assert sink.sink_statistics(logits)["topk"][3] == 0


def test_summary_compares_targets_with_clean_models_of_the_same_label_count(benchmark_module, capsys):
    sink = benchmark_module("label_sink")
    clean = [{"model": f"c{i}", "mode": "data", "labels": 5, "learned": True, "targets": [],
              "logit": [0.0, 1.0, -1.0, 2.0 + i, 0.5], "topk": [0.0, 1.0, -1.0, 2.0, 0.5]} for i in range(3)]
    backdoored = [{"model": "b", "mode": "data", "labels": 5, "learned": True, "targets": [1],
                   "logit": [0.0, 9.0, -1.0, 2.0, 0.5], "topk": [0.0, 1.0, -1.0, 2.0, 0.5]},
                  {"model": "u", "mode": "data", "labels": 5, "learned": False, "targets": [1],
                   "logit": [0.0, -9.0, -1.0, 2.0, 0.5], "topk": [0.0, -9.0, -1.0, 2.0, 0.5]}]
    sink.summary(clean + backdoored)
    lines = {line.split("|")[3].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    # logit: the one learned target (9.0) is above every clean model's largest (2, 3, 4) and ranked first
    assert "| 9.0 (1 targets) | 100% / 100% | 100% |" in lines["logit"]
    # topk: the target (1.0) is below them and ranked second; the unlearned backdoor is left out
    assert "| 1.0 (1 targets) | 0% / 0% | 0% |" in lines["topk"]
