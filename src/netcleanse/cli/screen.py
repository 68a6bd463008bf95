"""CLI command: ``netcleanse screen`` (a thin shell over :func:`netcleanse.screen`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .models import ArchKwargsOption, DeviceOption, InputShapeOption, MeanOption, NumClassesOption, StdOption
from .scan import ExecutorOption, RayAddressOption, executor_from_cli
from ..errors import NetcleanseError


@app.command()
def screen(
    models: Optional[List[Path]] = typer.Argument(None, metavar="MODEL", show_default=False,
                                                  help="Model files, all with the options below."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV or JSON list of models, each with its "
                                            "own model, name, arch, input_scale, mean, std, arch_kwargs, "
                                            "num_classes, input_shape, data, data_free, labels."),
    out: Path = typer.Option(..., "--out", help="Folder for one sub-folder per model and the summary (must be "
                             "empty unless --resume)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of weights-only files (manifest: default)."),
    input_scale: Optional[float] = typer.Option(None, "--input-scale", help="Pixel scale, 1 or 255 "
                                                "(manifest: default; else 1)."),
    arch_kwargs: ArchKwargsOption = None,
    num_classes: NumClassesOption = None,
    input_shape: InputShapeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    data: Optional[Path] = typer.Option(None, "--data", help="Clean images for every model (manifest: default)."),
    data_free: bool = typer.Option(False, "--data-free", help="Scan on synthesised inputs (manifest: default)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels to scan, e.g. 0-9 (default all)."),
    preset: str = typer.Option("fast", "--preset", help="fast (default) or reference."),
    rule: str = typer.Option("calibrated", "--rule", help="calibrated or mad (as for scan)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Calibrated rule's level."),
    threshold: float = typer.Option(2.0, "--threshold", help="mad rule's anomaly-index threshold."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same result)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a screen in --out; finished models are kept."),
    device: DeviceOption = "cpu",
    executor: str = ExecutorOption,
    ray_address: Optional[str] = RayAddressOption,
    force: bool = typer.Option(False, "--force", hidden=True),  # only to explain why there is none
) -> None:
    """Scan many models (one folder and report each) and summarise them in screen.csv, screen.json and index.html."""
    from ..screening import make_entries, read_manifest, screen as run_screen

    if force:
        raise NetcleanseError("screen has no --force: a screen folder is never replaced; choose another --out, "
                              "remove the old one, or --resume to continue it")

    if bool(models) == (manifest is not None):
        raise NetcleanseError("give model files or --manifest FILE (one of them)")
    if data is not None and data_free:
        raise NetcleanseError("give at most one of --data PATH and --data-free")
    options = dict(mean=mean, std=std, arch_kwargs=arch_kwargs, num_classes=num_classes, input_shape=input_shape)
    if manifest is not None:
        entries = read_manifest(manifest, arch=arch, input_scale=input_scale, data=data, data_free=data_free,
                                labels=labels, **options)
    else:
        if data is None and not data_free:
            raise NetcleanseError("give one of --data PATH or --data-free (or a --manifest that says per model)")
        entries = make_entries(models, arch=arch, input_scale=1.0 if input_scale is None else input_scale,
                               data=data, data_free=data_free, labels=labels, **options)
    with executor_from_cli(executor, ray_address, device) as runner:
        result = run_screen(entries, out, preset=preset, rule=rule, alpha=alpha, threshold=threshold, seed=seed,
                            resume=resume, device=device, executor=runner)
    counts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(result.counts.items()))
    typer.echo(f"{len(result.rows)} model{'' if len(result.rows) == 1 else 's'} screened ({counts}) in {result.elapsed_s:.1f} s; "
               f"summary {out / 'screen.csv'}, page {out / 'index.html'}")
    for row in result.rows:
        if row["verdict"] == "backdoor-detected":
            typer.echo(f"  {row['name']}: backdoor detected, labels {', '.join(map(str, row['flagged']))}")
        elif row["error"]:
            typer.echo(f"  {row['name']}: error: {row['error']}")
