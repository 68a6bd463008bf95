"""Progress away from a terminal: timed plain lines with an ETA, and one when a task ends."""

import io

import netcleanse.progress as progress_module
from netcleanse.progress import LineProgress, progress_bar


def test_a_log_gets_timed_lines_with_an_eta_and_a_final_line(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with LineProgress(every=30, stream=out) as bar:
        task = bar.add_task("refine: 40 labels", total=40)
        for _ in range(10):  # 10 labels in 20 s: under the 30 s between lines, nothing yet
            clock[0] += 2
            bar.advance(task)
        assert out.getvalue() == ""
        clock[0] += 20  # 40 s after the start, over 30 s since the last line: a line with the rate so far
        bar.update(task, completed=15)
        clock[0] += 60
        bar.update(task, completed=40)
    lines = out.getvalue().splitlines()
    assert lines[0] == "refine: 40 labels: 15/40 (38 %), elapsed 0:00:40, ETA 0:01:07"  # 25 more at 15 per 40 s
    assert lines[1] == "refine: 40 labels: 40/40 (100 %), elapsed 0:01:40" and len(lines) == 2


def test_a_task_that_stops_early_says_where_and_disabled_means_silent(monkeypatch, capsys):
    out = io.StringIO()
    with LineProgress(stream=out) as bar:
        bar.add_task("coarse: 10 labels", total=10, completed=3)
    assert out.getvalue().startswith("coarse: 10 labels: 3/10 (30 %), elapsed")
    monkeypatch.setenv("NETCLEANSE_NO_PROGRESS", "1")
    with progress_bar() as bar:  # (pytest's stderr is no terminal: the line form, were it enabled)
        bar.add_task("x", total=1)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("NETCLEANSE_NO_PROGRESS")
    assert isinstance(progress_bar(), LineProgress)
