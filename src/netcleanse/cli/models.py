"""CLI commands on a model: ``info``, ``predict``, ``eval``; and the model options other commands share.

Other command modules import :data:`ModelArgument`, :data:`ArchOption`, :data:`InputScaleOption`,
the other model options (:data:`ArchKwargsOption`, :data:`NumClassesOption`, :data:`InputShapeOption`,
:data:`MeanOption`, :data:`StdOption`), :data:`JsonOption`, :data:`ForceOption`, :data:`DeviceOption`
and :func:`load_model_from_cli`, so every command reads a model (and where it computes) the same way.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path
from typing import Annotated, Optional

import h5py
import numpy as np
import torch
import typer

from . import app
from ..data import Dataset, load_data
from ..errors import NetcleanseError
from ..evaluate import evaluate, predict_dataset
from ..model import Classifier, checked_scale, load_model
from ..sniff import sniff
from ..utils import atomic_write, resolve_device, spreadsheet_safe


def _device(value: str) -> str:
    """``--device`` checked when the command line is read, before any work (same check as the API's)."""
    resolve_device(value)
    return value


def _positive_scale(value: float) -> float:
    try:
        return checked_scale(value)
    except NetcleanseError:
        raise NetcleanseError(f"--input-scale must be a positive number (1 or 255 in practice), got {value}") from None


ModelArgument = Annotated[Path, typer.Argument(help="Model file: Keras .h5/.keras, PyTorch .pt/TorchScript/"
                                                     "state_dict, .safetensors, .onnx, or a netcleanse (guarded) "
                                                     "checkpoint.",
                                                metavar="MODEL", show_default=False)]
ArchOption = Annotated[Optional[str], typer.Option(
    "--arch", help="Architecture of a weights-only file: a registered name (csaw-deepid, gtsrb-cnn, mnist-cnn), "
                   "torchvision:NAME, timm:NAME, FILE.py:CLASS or package.module:CLASS (naming Python code "
                   "runs it).")]
ArchKwargsOption = Annotated[Optional[str], typer.Option(
    "--arch-kwargs", help="JSON object of keyword arguments for the --arch class or zoo model.")]
NumClassesOption = Annotated[Optional[int], typer.Option(
    "--num-classes", min=1, help="Number of classes, for a zoo --arch where the weights do not tell.")]
InputShapeOption = Annotated[Optional[str], typer.Option(
    "--input-shape", help="Input CxHxW (e.g. 3x224x224) where the model file or --arch does not record it.")]
InputScaleOption = Annotated[float, typer.Option(
    "--input-scale", callback=_positive_scale,
    help="Multiply [0,1] pixels by this before the network: 1, or 255 for nets trained on raw pixels.")]
MeanOption = Annotated[Optional[str], typer.Option(
    "--mean", help="Per-channel mean R,G,B subtracted after --input-scale (e.g. 0.485,0.456,0.406).")]
StdOption = Annotated[Optional[str], typer.Option(
    "--std", help="Per-channel std R,G,B divided by after the mean (e.g. 0.229,0.224,0.225).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
BatchSizeOption = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, help="Images per forward pass (default: up to 512, fewer where NETCLEANSE_PASS_MIB "
                                "would be exceeded).")]
DeviceOption = Annotated[str, typer.Option(
    "--device", callback=_device, help="Where the model computes: cpu or cuda (a CUDA GPU).")]


def load_model_from_cli(path: Path, arch: str | None = None, input_scale: float = 1.0, *,
                        arch_kwargs: str | None = None, num_classes: int | None = None,
                        input_shape: str | None = None, mean: str | None = None,
                        std: str | None = None) -> Classifier:
    """Load the model named on the command line (the one way every command does it)."""
    return load_model(path, arch=arch, input_scale=_positive_scale(input_scale), mean=mean, std=std,
                      arch_kwargs=arch_kwargs, num_classes=num_classes, input_shape=input_shape)


def _echo_json(payload) -> None:
    typer.echo(json.dumps(payload, indent=2))


def model_format(path: Path, model: Classifier) -> str:
    """A short description of the file format a model came from (read from headers, nothing executed)."""
    kind = sniff(path)
    if kind == "hdf5":
        with h5py.File(path, "r") as h5:
            version = h5.attrs.get("keras_version", b"")
            version = version.decode() if isinstance(version, bytes) else str(version)
            kind = "whole-model" if "model_config" in h5.attrs else "weights-only"
        return f"Keras {kind} .h5" + (f" (Keras {version})" if version else "")
    if kind == "keras-archive":
        return "Keras 3 .keras archive"
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.split("/", 1)[-1].startswith("code/") for name in names):
            return "TorchScript"
        if model.poison_label is not None:
            return "netcleanse guarded checkpoint"
        from ..torch_io import FORMAT, load_weights_only
        ckpt = load_weights_only(path)  # loaded once already
        return ("netcleanse checkpoint" if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT
                else "PyTorch state_dict")
    if kind == "torch-legacy":
        return "PyTorch state_dict (legacy torch.save format)"
    if kind == "safetensors":
        return "safetensors state_dict"
    if path.suffix.lower() == ".onnx":
        return "ONNX (converted by onnx2torch)"
    return "unknown"


@app.command()
def info(model_path: ModelArgument, arch: ArchOption = None, input_scale: InputScaleOption = 1.0,
         json_output: JsonOption = False, arch_kwargs: ArchKwargsOption = None,
         num_classes: NumClassesOption = None, input_shape: InputShapeOption = None, mean: MeanOption = None,
         std: StdOption = None,
         data: Annotated[Optional[Path], typer.Option(
             "--data", help="Clean images (labelled or not) to check the preprocessing on.")] = None,
         device: DeviceOption = "cpu") -> None:
    """Show a model's layers, parameters, input shape, preprocessing and number of classes."""
    model = load_model_from_cli(model_path, arch, input_scale, arch_kwargs=arch_kwargs, num_classes=num_classes,
                                input_shape=input_shape, mean=mean, std=std)
    if data is not None:
        from ..sanity import check_preprocessing, warn
        warn(check_preprocessing(model, load_data(data, expect_shape=model.input_shape), device=device))
    layers = model.layer_table()
    summary = {
        "name": model.name, "source": model.source or str(model_path),
        "format": model_format(model_path, model), "arch": model.arch,
        "input_shape": list(model.input_shape), "input_scale": model.preprocessing["input_scale"],
        "mean": model.preprocessing["mean"], "std": model.preprocessing["std"],
        "num_classes": model.num_classes, "poison_label": model.poison_label,
        "parameters": model.num_parameters(),
        "layers": [{"name": n, "type": t, "parameters": p} for n, t, p in layers],
    }
    if json_output:
        _echo_json(summary)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    c, h, w = model.input_shape
    console.print(f"model        {model.name}", highlight=False)
    console.print(f"source       {summary['source']}", highlight=False)
    console.print(f"format       {summary['format']}" + (f", architecture {model.arch}" if model.arch else ""),
                  highlight=False)
    console.print(f"input        {c}x{h}x{w} (CxHxW), pixels x in [0,1]", highlight=False)
    console.print(f"preprocess   the network sees {model.describe_preprocessing()}", highlight=False, soft_wrap=True)
    console.print(f"classes      {model.num_classes}", highlight=False)
    if model.poison_label is not None:
        console.print(f"guarded      answers {model.poison_label} for inputs it judges poisoned", highlight=False)
    console.print(f"parameters   {model.num_parameters():,}", highlight=False)
    table = Table(title="layers", title_justify="left")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("parameters", justify="right")
    for name, kind, count in layers:
        table.add_row(name, kind, f"{count:,}")
    print_table(table)


def print_table(table) -> None:
    """Print a rich table at its full width, wider than the terminal (or a pipe's 80 columns) where
    it must: names and numbers are never cut short."""
    from rich.console import Console
    console = Console()
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    (Console(width=natural) if natural > console.width else console).print(table)


def _check_predictions_out(path: Path, force: bool) -> None:
    """Refuse a --out for predictions before the work, not after it."""
    if path.suffix.lower() not in (".csv", ".npz"):
        raise NetcleanseError(f"--out {path}: use a .csv or .npz file name")
    if path.is_dir():
        raise NetcleanseError(f"--out {path} is a folder; give a .csv or .npz file name")
    if path.exists() and not force:
        raise NetcleanseError(f"{path} already exists (use --force to overwrite)")


def _write_predictions(path: Path, data: Dataset, labels, confidence) -> None:
    """Per-sample predictions to .csv (index,name,label,confidence[,true_label]) or .npz."""
    with atomic_write(path) as temporary:
        if path.suffix.lower() == ".npz":
            arrays = {"labels": labels.numpy(), "confidence": confidence.numpy()}
            if data.y is not None:
                arrays["true_labels"] = data.y.numpy()
            if data.names is not None:
                arrays["names"] = np.array(data.names, dtype=str)
            with open(temporary, "wb") as f:
                np.savez(f, **arrays)
        else:
            with open(temporary, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["index", "name", "label", "confidence"] + (["true_label"] if data.y is not None else []))
                for i, (label, conf) in enumerate(zip(labels.tolist(), confidence.tolist())):
                    name = spreadsheet_safe(data.names[i]) if data.names is not None else ""  # names from files
                    writer.writerow([i, name, label, f"{conf:.6f}"] + ([int(data.y[i])] if data.y is not None else []))


@app.command()
def predict(model_path: ModelArgument,
            inputs: Annotated[list[Path], typer.Argument(help="Image files, folders of images, or one "
                                                               ".h5/.npz dataset file.", metavar="INPUT",
                                                               show_default=False)],
            arch: ArchOption = None, input_scale: InputScaleOption = 1.0, json_output: JsonOption = False,
            out: Annotated[Optional[Path], typer.Option(
                "--out", help="Write per-sample predictions to this .csv or .npz file.")] = None,
            force: ForceOption = False, batch_size: BatchSizeOption = None, arch_kwargs: ArchKwargsOption = None,
            num_classes: NumClassesOption = None, input_shape: InputShapeOption = None, mean: MeanOption = None,
            std: StdOption = None, device: DeviceOption = "cpu") -> None:
    """Predict labels: one `PATH<TAB>LABEL<TAB>CONFIDENCE` line per image, or for a dataset file a
    summary (and accuracy when it has labels) with per-sample labels written to --out."""
    model = load_model_from_cli(model_path, arch, input_scale, arch_kwargs=arch_kwargs, num_classes=num_classes,
                                input_shape=input_shape, mean=mean, std=std)
    if out is not None:
        _check_predictions_out(out, force)
    from ..sanity import check_outputs, warn
    squashed = check_outputs(model)
    if squashed:  # the confidence shown would be a softmax of probabilities
        warn(squashed)
    data = load_data(list(inputs), expect_shape=model.input_shape, num_classes=model.num_classes)
    labels, confidence = predict_dataset(model, data, batch_size, device=device)
    is_dataset_file = data.info.get("format") in ("hdf5", "npz")
    accuracy = int((labels == data.y).sum()) / len(data) if data.y is not None else None
    if out is not None:
        _write_predictions(out, data, labels, confidence)
    if json_output:
        payload = {"model": model.name, "source": data.source, "n": len(data), "accuracy": accuracy,
                   "out": None if out is None else str(out)}
        if not (is_dataset_file and out is not None):
            payload["predictions"] = [
                {"index": i, "name": data.names[i] if data.names is not None else None,
                 "label": label, "confidence": round(conf, 6)}
                for i, (label, conf) in enumerate(zip(labels.tolist(), confidence.tolist()))]
        _echo_json(payload)
        return
    if not is_dataset_file:
        for name, label, conf in zip(data.names, labels.tolist(), confidence.tolist()):
            typer.echo(f"{name}\t{label}\t{conf:.4f}")
        return
    typer.echo(f"{data.source}: {len(data)} images")
    if accuracy is not None:
        typer.echo(f"accuracy     {100 * accuracy:.2f}% (against the file's labels)")
    counts = np.bincount(labels.numpy(), minlength=model.num_classes)
    top = np.argsort(-counts, kind="stable")[:5]
    typer.echo("most answered " + ", ".join(f"{int(k)} ({int(counts[k])})" for k in top if counts[k]))
    if out is not None:
        typer.echo(f"per-sample labels written to {out}")
    else:
        typer.echo("(give --out FILE.csv or FILE.npz for the per-sample labels)")


@app.command(name="eval")
def eval_command(model_path: ModelArgument,
                 clean: Annotated[Optional[Path], typer.Option(
                     "--clean", help="Clean labelled data: .h5, .npz, image file or folder.")] = None,
                 poisoned: Annotated[Optional[Path], typer.Option(
                     "--poisoned", help="Poisoned data; its labels are the attack targets unless --target.")] = None,
                 target: Annotated[Optional[int], typer.Option(
                     "--target", help="The attack's target label (for every poisoned input).")] = None,
                 arch: ArchOption = None, input_scale: InputScaleOption = 1.0, json_output: JsonOption = False,
                 batch_size: BatchSizeOption = None, arch_kwargs: ArchKwargsOption = None,
                 num_classes: NumClassesOption = None, input_shape: InputShapeOption = None,
                 mean: MeanOption = None, std: StdOption = None, device: DeviceOption = "cpu") -> None:
    """Clean accuracy, attack success rate (CSAW semantics) and, for guarded models, the
    poison-detection and false-positive rates."""
    if clean is None and poisoned is None:
        raise NetcleanseError("give --clean DATA and/or --poisoned DATA")
    if target is not None and poisoned is None:
        raise NetcleanseError("--target needs --poisoned DATA")
    model = load_model_from_cli(model_path, arch, input_scale, arch_kwargs=arch_kwargs, num_classes=num_classes,
                                input_shape=input_shape, mean=mean, std=std)
    # Labels are range-checked by evaluate(), which knows whether poisoned labels are used at all.
    clean_data = load_data(clean, expect_shape=model.input_shape) if clean is not None else None
    if clean_data is not None:
        from ..sanity import check_preprocessing, warn
        warn(check_preprocessing(model, clean_data, device=device))
    poisoned_data = load_data(poisoned, expect_shape=model.input_shape) if poisoned is not None else None
    result = evaluate(model, clean_data, poisoned_data, target=target, batch_size=batch_size, device=device)
    if target is None and result.attack_success is not None and result.attack_success < 0.05 \
            and poisoned_data.y is not None and int(poisoned_data.y.unique().numel()) > 1:
        from ..sanity import warn  # (CSAW's poisoned files are labelled with their target; a folder by class is not)
        warn(f"the attack success is measured against {poisoned}'s own labels, which name "
             f"{int(poisoned_data.y.unique().numel())} classes: if they are the images' true classes, give the "
             "attack's target with --target")
    if json_output:
        _echo_json({"model": model.name, "clean": None if clean is None else str(clean),
                    "poisoned": None if poisoned is None else str(poisoned), **result.to_dict()})
        return
    typer.echo(f"model             {model.name} ({model.num_classes} classes)")
    if result.clean_accuracy is not None:
        typer.echo(f"clean accuracy    {100 * result.clean_accuracy:6.2f}%  ({result.n_clean} images, {clean})")
    if result.attack_success is not None:
        target_text = f"target {target}" if target is not None else "targets from the file's labels"
        typer.echo(f"attack success    {100 * result.attack_success:6.2f}%  "
                   f"({result.n_poisoned} poisoned images, {target_text})")
    if model.poison_label is not None:
        if result.poison_detection is not None:
            typer.echo(f"poison detected   {100 * result.poison_detection:6.2f}%  "
                       f"(poisoned inputs answered {model.poison_label})")
        if result.false_positive is not None:
            typer.echo(f"false positives   {100 * result.false_positive:6.2f}%  "
                       f"(clean inputs answered {model.poison_label})")
