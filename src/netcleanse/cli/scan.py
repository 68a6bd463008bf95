"""CLI command: ``netcleanse scan`` (a thin shell over :func:`netcleanse.scan`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from ..errors import NetcleanseError
from .models import (ArchKwargsOption, ArchOption, DeviceOption, InputScaleOption, InputShapeOption, MeanOption,
                     ModelArgument, NumClassesOption, StdOption)


ExecutorOption = typer.Option("local", "--executor", help="Where the work runs: local (this process) or ray "
                              "(Ray tasks; needs the optional Ray extra).")
RayAddressOption = typer.Option(None, "--ray-address", metavar="ADDR", help="With --executor ray: the cluster to "
                                "use (e.g. 10.0.0.5:6379, or auto); default: start a local Ray instance.")


def executor_from_cli(name: str, address: str | None, device: str = "cpu"):
    """The executor the command line asks for; Ray tasks ask for a GPU each with ``--device cuda``."""
    from ..executor import make_executor
    if name == "ray":
        from . import stop_on_sigterm
        executor = make_executor(name, address, gpus_per_task=1 if device == "cuda" else 0)
        stop_on_sigterm()  # Ray's start replaced the handler with one that aborts the process
        return executor
    return make_executor(name, address)


@app.command()
def scan(
    model_path: ModelArgument,
    arch: ArchOption = None,
    input_scale: InputScaleOption = 1.0,
    arch_kwargs: ArchKwargsOption = None,
    num_classes: NumClassesOption = None,
    input_shape: InputShapeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    data: Optional[Path] = typer.Option(None, "--data", help="Clean images to scan with (file or folder)."),
    data_free: bool = typer.Option(False, "--data-free", help="No clean data: scan on synthesised inputs."),
    out: Path = typer.Option(..., "--out", help="Folder for scan.json, masks.npz and images (must be empty)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels to scan, e.g. 0,5,7-9 (default all)."),
    preset: str = typer.Option("fast", "--preset", help="fast (default) or reference (the original protocol)."),
    rule: str = typer.Option("calibrated", "--rule", help="calibrated (model-level test at --alpha) or mad "
                             "(the paper's anomaly index > --threshold)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Calibrated rule: bound on the chance of flagging a model "
                                "without a backdoor."),
    threshold: float = typer.Option(2.0, "--threshold", help="mad rule: flag labels whose anomaly index exceeds this."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same result)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan in --out."),
    device: DeviceOption = "cpu",
    save_all_images: bool = typer.Option(False, "--save-all-images", help="Write trigger PNGs for every label."),
    executor: str = ExecutorOption,
    ray_address: Optional[str] = RayAddressOption,
    force: bool = typer.Option(False, "--force", hidden=True),  # only to explain why there is none
) -> None:
    """Reverse-engineer a trigger for every label (Neural Cleanse) and flag backdoor targets."""
    from ..scanning import parse_labels, scan as run_scan
    from .models import load_model_from_cli

    if force:
        raise NetcleanseError("scan has no --force: a scan folder is never replaced; choose another --out, remove "
                              "the old one, or --resume an interrupted scan in it")

    if (data is None) == (not data_free):
        raise NetcleanseError("give exactly one of --data PATH or --data-free")
    model = load_model_from_cli(model_path, arch, input_scale, arch_kwargs=arch_kwargs, num_classes=num_classes,
                                input_shape=input_shape, mean=mean, std=std)
    dataset = None
    if data is not None:
        from ..data import load_data
        dataset = load_data(data, expect_shape=model.input_shape, num_classes=model.num_classes)
    runner = executor_from_cli(executor, ray_address, device)
    with runner:
        result = run_scan(model, dataset, data_free=data_free, labels=parse_labels(labels, model.num_classes),
                          preset=preset, rule=rule, alpha=alpha, threshold=threshold, seed=seed, out=out,
                          resume=resume, device=device, save_all_images=save_all_images,
                          data_name=None if data is None else str(data), executor=runner)
    typer.echo(verdict(result))
    from ..report import render_report
    typer.echo(f"scan took {result.elapsed_s:.1f} s; results in {out}; report {render_report(out)}")


def verdict(result) -> str:
    """One line for the terminal. Flagged labels are listed most anomalous first."""
    from ..calibrated import most_anomalous
    n = len(result.labels)
    top = _describe(most_anomalous(result.labels, calibrated=result.rule == "calibrated"))
    if result.rule == "calibrated":
        test = f"model-level p = {_p(result.p_value)}, alpha {result.alpha:g}"
        if result.verdict == "inconclusive":
            return (f"INCONCLUSIVE: no label of {n} could have been flagged at alpha {result.alpha:g}, not even "
                    f"one needing an empty mask (too few labels, or no spread among the reference labels); "
                    f"most anomalous label {top}")
        if not result.flagged:
            return f"no backdoor detected ({test}; {n} labels scanned); most anomalous label {top}"
        listed = ", ".join(_describe(result.record(t)) for t in result.flagged)  # step-down order
        return f"BACKDOOR DETECTED ({test}): {len(result.flagged)} of {n} labels flagged, most anomalous first: {listed}"
    if result.verdict == "inconclusive":
        return (f"INCONCLUSIVE: no label flagged among {n} scanned, but none could have been: even an empty mask "
                f"would score {result.index_ceiling:.2f}, not above the threshold {result.threshold:g} (too few "
                f"labels, or their mask sizes spread too widely); most anomalous label {top}")
    if not result.flagged:
        return f"no label flagged among {n} scanned (threshold {result.threshold:g})"
    ranked = sorted(result.flagged, key=lambda t: -result.record(t)["anomaly_index"])
    listed = ", ".join(_describe(result.record(t)) for t in ranked)
    return f"BACKDOOR SUSPECTED: {len(ranked)} of {n} labels flagged, most anomalous first: {listed}"


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def _describe(record: dict) -> str:
    """"7 (p 0.0001, index 3.30, mask L1 18.2, 6 % of the median)": the p-value says how unlikely
    such a label is in a model without a backdoor, the index how unusual the trigger is, the ratio
    how small. Scans saved before p-values or the ratio were recorded show what they have."""
    ratio = record.get("mask_l1_vs_median")
    size = f", {100 * ratio:.0f} % of the median" if isinstance(ratio, (int, float)) else ""
    p = f"p {_p(record['p_value'])}, " if record.get("p_value") is not None else ""
    transfer = record.get("transferability")
    moved = f", transferability {transfer:.2f}" if isinstance(transfer, (int, float)) else ""
    return f"{record['label']} ({p}index {record['anomaly_index']:.2f}, mask L1 {record['mask_l1']:.1f}{size}{moved})"
