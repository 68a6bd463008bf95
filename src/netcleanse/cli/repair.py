"""CLI command ``repair``: a thin shell over :func:`netcleanse.repair.repair`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ..errors import NetcleanseError
from .models import (ArchKwargsOption, ArchOption, DeviceOption, ForceOption, InputScaleOption, InputShapeOption,
                     JsonOption, MeanOption, ModelArgument, NumClassesOption, StdOption, load_model_from_cli,
                     print_table)

METHOD_HELP = ("fine-prune (Liu et al. 2018; needs --data), unlearn (Neural Cleanse; needs --data), "
               "filter (guarded N+1 model from the reversed triggers; data-free), "
               "disagree (guarded: original vs fine-pruned disagree -> N+1; needs --data)")


def _drops(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NetcleanseError(f"--drops must be comma-separated percentage points, e.g. 2,4,10,30 (got {text!r})") from None
    if not values or min(values) <= 0:
        raise NetcleanseError(f"--drops must be positive percentage points, e.g. 2,4,10,30 (got {text!r})")
    return values


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _print_table(rows: list[dict]) -> None:
    from rich.table import Table

    columns = [("model", "model"), ("drop_threshold", "drop"), ("fraction_pruned", "pruned %"),
               ("clean_val_accuracy", "val acc %"), ("clean_accuracy", "clean acc %"),
               ("attack_success", "ASR %"), ("attack_success_by_set", "ASR % by set"),
               ("poison_detection", "detected %"), ("false_positive", "false pos %"),
               ("clean_accuracy_after_fine_tuning", "clean acc % (ft)"),
               ("attack_success_after_fine_tuning", "ASR % (ft)"),
               ("attack_success_by_set_after_fine_tuning", "ASR % by set (ft)")]
    present = [(key, title) for key, title in columns if any(key in row for row in rows)]
    table = Table()
    for _, title in present:
        table.add_column(title, justify="left" if title == "model" else "right")
    for row in rows:
        cells = []
        for key, _ in present:
            value = row.get(key)
            if key == "model":
                cells.append(str(value))
            elif key == "drop_threshold":
                cells.append("-" if value is None else f"{value:g}")
            elif key.startswith("attack_success_by_set"):
                cells.append("-" if value is None else " / ".join(_percent(v) for v in value))
            else:
                cells.append(_percent(value))
        table.add_row(*cells)
    print_table(table)


# the methods each method-specific option serves: one given to another method is refused, not ignored
_METHOD_OPTIONS = {"drops": ("fine-prune", "disagree"), "select_drop": ("fine-prune", "disagree"),
                   "layer": ("fine-prune", "disagree"), "fine_tune_epochs": ("fine-prune", "disagree"),
                   "epochs": ("unlearn",), "fraction": ("unlearn",), "quantile": ("filter",),
                   "lr": ("fine-prune", "disagree", "unlearn")}


def _refuse_unused(ctx: typer.Context, method: str, fine_tune_epochs: int) -> None:
    for name, methods in _METHOD_OPTIONS.items():
        source = ctx.get_parameter_source(name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        flag = "--" + name.replace("_", "-")
        if method not in methods:
            hint = " (fine-tuning after pruning: --fine-tune-epochs)" if name == "epochs" else ""
            raise NetcleanseError(f"{flag} is an option of {' and '.join(methods)}, not of --method {method}{hint}")
        if name == "lr" and method in ("fine-prune", "disagree") and fine_tune_epochs == 0:
            raise NetcleanseError(f"--lr is the learning rate of fine-tuning: give --fine-tune-epochs N with it "
                                  f"(--method {method} trains nothing without)")


@app.command()
def repair(
    ctx: typer.Context,
    model_path: ModelArgument,
    out: Annotated[Path, typer.Option("--out", help="Output folder (repair.json + model files).")],
    scan: Annotated[Optional[Path], typer.Option(
        "--scan", help="Scan output folder (scan.json + masks.npz); needed by unlearn and filter.")] = None,
    method: Annotated[str, typer.Option("--method", help=METHOD_HELP)] = "fine-prune",
    data: Annotated[Optional[Path], typer.Option("--data", help="Labelled clean validation data.")] = None,
    test_clean: Annotated[Optional[Path], typer.Option("--test-clean", help="Clean test set for the table.")] = None,
    test_poisoned: Annotated[Optional[list[Path]], typer.Option(
        "--test-poisoned", help="Poisoned test set(s) for the ASR column (repeat for several targets).")] = None,
    target: Annotated[Optional[int], typer.Option(
        "--target", help="Attack target (default: each poisoned row's own label).")] = None,
    drops: Annotated[str, typer.Option("--drops", help="Accuracy drops (points) at which to save pruned models.")] = "2,4,10,30",
    select_drop: Annotated[float, typer.Option(
        "--select-drop", help="Fine-pruning result: the model of the largest drop threshold not above this.")] = 4.0,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Convolutional layer to prune.")] = None,
    fine_tune_epochs: Annotated[int, typer.Option("--fine-tune-epochs", min=0,
                                                  help="Fine-tune pruned models this many epochs.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Unlearning epochs.")] = 10,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="Adam learning rate (default: 1e-3 fine-tuning, 3e-3 unlearning).")] = None,
    fraction: Annotated[float, typer.Option("--fraction", help="Unlearning: fraction stamped with triggers.")] = 0.5,
    quantile: Annotated[float, typer.Option("--quantile", help="Filter: threshold quantile of trigger-free scores, "
                                                               "where a flagged label has fewer than 10 genuine clean "
                                                               "inputs (data-free, or few of it); else the 0.99 "
                                                               "quantile of its genuine inputs is used.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    force: ForceOption = False,
    arch: ArchOption = None,
    input_scale: InputScaleOption = 1.0,
    json_output: JsonOption = False,
    arch_kwargs: ArchKwargsOption = None,
    num_classes: NumClassesOption = None,
    input_shape: InputShapeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    device: DeviceOption = "cpu",
) -> None:
    """Repair a backdoored model after a scan; write repair.json, .pt and Keras .h5 (or a guarded .pt)."""
    from ..data import load_data
    from ..repair import METHODS, RepairOptions, repair as run_repair, scan_triggers
    from ..repair.inputs import check_scan_model
    from ..sanity import warn
    from ..utils import check_out_dir

    if method not in METHODS:
        raise NetcleanseError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    _refuse_unused(ctx, method, fine_tune_epochs)
    if (out / "repair.json").exists() and not force:
        missing = "" if (out / "report.html").exists() else f" (its report is missing: `netcleanse report {out}` writes it)"
        raise NetcleanseError(f"{out} already holds a repair (repair.json); choose another --out or use --force{missing}")
    check_out_dir(out, force)
    if (out / "scan.json").exists() and (scan is None or out.resolve() != scan.resolve()):
        # the report of this folder would show that scan beside this repair
        raise NetcleanseError(f"{out} holds another scan (scan.json); choose another --out")
    if method in ("filter", "unlearn") and scan is None:
        raise NetcleanseError(f"--method {method} needs the scan's reversed triggers: give --scan DIR")
    drop_values = _drops(drops)
    model = load_model_from_cli(model_path, arch, input_scale, arch_kwargs=arch_kwargs, num_classes=num_classes,
                                input_shape=input_shape, mean=mean, std=std)
    if model.poison_label is not None:
        raise NetcleanseError(f"{model_path} is already a guarded model; repair the original model")
    if scan is not None:
        check_scan_model(scan, model)
    triggers = scan_triggers(scan) if scan is not None else {}
    if method in ("filter", "unlearn"):  # said before the data is read (minutes for a big set)
        from ..trigger import need_triggers
        need_triggers(triggers, "unlearn" if method == "unlearn" else "build a filter from")
    shape, classes = model.input_shape, model.num_classes
    clean = load_data(data, expect_shape=shape, num_classes=classes) if data is not None else None
    tests_clean = load_data(test_clean, expect_shape=shape, num_classes=classes) if test_clean is not None else None
    tests_poisoned = [load_data(p, expect_shape=shape) for p in test_poisoned or []] or None
    options = RepairOptions(drops=drop_values, layer=layer, select_drop=select_drop, fine_tune_epochs=fine_tune_epochs,
                            lr=lr, epochs=epochs, fraction=fraction, quantile=quantile, seed=seed, device=device)
    result = run_repair(model, triggers, method, clean, options=options, test_clean=tests_clean,
                        test_poisoned=tests_poisoned, target=target)
    # the scan as seen from the repair's folder, so a report finds it from any working directory
    result.settings.update(model=str(model_path), scan=os.path.relpath(scan, out) if scan else None,
                           data=str(data) if data else None)
    result.save(out, force=force)
    for message in result.settings.get("warnings", []):
        warn(message)
    report = None
    if scan is not None:  # the report needs the scan; repair.json names it
        from ..report import render_report
        report = render_report(out)
    if json_output:
        typer.echo(json.dumps(json.loads((out / "repair.json").read_text()), indent=2))
        return
    typer.echo(f"method {method}; " + (f"flagged labels from the scan: {result.flagged or 'none'}" if scan is not None
                                        else "no scan given"))
    _print_table(result.table)
    record = json.loads((out / "repair.json").read_text())
    stem = "guarded" if result.model.poison_label is not None else "repaired"
    typer.echo(f"wrote {out / 'repair.json'} and {' and '.join(record['files'][stem])} in {out}"
               + (f" ({record['notes'][stem]})" if stem in record.get("notes", {}) else ""))
    if report is not None:
        typer.echo(f"report {report}")
