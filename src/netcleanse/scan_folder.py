"""A scan's output folder: the only reader and writer of its ``scan.json`` and ``masks.npz``.

A finished scan folder holds

* ``masks.npz``: arrays ``labels`` (L,), ``masks`` (L, H, W) and ``patterns`` (L, C, H, W), one
  row per scanned label (written with NumPy, read with ``allow_pickle=False``);
* PNGs of the reversed triggers: ``<model>_visualize_{mask,pattern,fusion}_label_<label>.png``
  for the flagged labels (all labels on request) and ``triggers/label_<label>_{mask,pattern,fusion}.png``
  for the flagged labels;
* ``scan.json``: the scan's record (:meth:`netcleanse.scanning.ScanResult.to_dict`), written last,
  so that a folder with ``scan.json`` holds a finished scan.

scan.json and masks.npz are written atomically (:mod:`netcleanse.utils`). Readers raise a one-line
:class:`NetcleanseError` for a missing, unreadable or malformed file.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NetcleanseError
from .utils import file_stem, read_json_object, write_json_atomic, write_npz_atomic

SCAN_JSON = "scan.json"
MASKS_NPZ = "masks.npz"
FORMAT, FORMAT_VERSION = "netcleanse-scan", 1  # scan.json's "format" and "version" (not checked on reading)


@dataclass
class TriggerArrays:
    """The contents of ``masks.npz``: masks (L, H, W) and patterns (L, C, H, W) indexed by label."""

    labels: np.ndarray
    masks: np.ndarray
    patterns: np.ndarray

    def __post_init__(self):
        self.row = {int(label): i for i, label in enumerate(self.labels)}

    def get(self, label: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(mask, pattern) of ``label``, or None if the file has no row for it."""
        i = self.row.get(int(label))
        return None if i is None else (self.masks[i], self.patterns[i])


def is_scan_folder(directory) -> bool:
    """Whether ``directory`` holds both ``scan.json`` and ``masks.npz``."""
    d = Path(directory)
    return (d / SCAN_JSON).is_file() and (d / MASKS_NPZ).is_file()


def require_scan_folder(directory) -> Path:
    """``directory`` as a Path; an error if it lacks ``scan.json`` or ``masks.npz``."""
    d = Path(directory)
    if not is_scan_folder(d):
        if unfinished(d):
            raise NetcleanseError(f"{d} holds a scan that did not finish; rerun the same scan command with --resume")
        raise NetcleanseError(f"{d} is not a scan output folder (it needs scan.json and masks.npz; "
                              "run `netcleanse scan ... --out DIR` first)")
    return d


def unfinished(directory) -> bool:
    """Whether ``directory`` holds a scan that started (its resume key) but wrote no scan.json."""
    d = Path(directory)
    return (d / "scan_settings.json").is_file() and not (d / SCAN_JSON).is_file()


def read_scan_json(path: Path) -> dict:
    """A ``scan.json``'s record, checked to be one (:func:`check_scan_record`)."""
    record = read_json_object(path)
    check_scan_record(record, path)
    return record


def check_scan_record(record: dict, path) -> None:
    """Refuse a record that is not a scan's, in one line: it needs ``labels`` (a non-empty list of
    records, each with an integer ``label``, no label twice, and a finite ``mask_l1`` >= 0) and
    ``flagged`` (a list of scanned labels); ``model``, ``settings`` and ``test``, where present,
    are objects. A report or repair must never read another file's numbers
    (a lab's truth.json saved as scan.json, say) as a verdict."""
    def bad(what: str) -> NetcleanseError:
        return NetcleanseError(f"{path} is not a scan's record: {what}")
    labels = record.get("labels")
    if not isinstance(labels, list) or not labels:
        raise bad("'labels' must be a non-empty list of per-label records")
    seen = set()
    for i, rec in enumerate(labels):
        label = rec.get("label") if isinstance(rec, dict) else None
        if not isinstance(label, int) or isinstance(label, bool):
            raise bad(f"labels[{i}] has no integer 'label'")
        if label in seen:
            raise bad(f"label {label} is listed twice")
        seen.add(label)
        l1 = rec.get("mask_l1")
        # (scans before 2026-12-05 could record -4e-5: float32 rounding of a saturated mask)
        if not isinstance(l1, (int, float)) or isinstance(l1, bool) or not math.isfinite(l1) or l1 < -0.01:
            raise bad(f"label {label} has no finite mask_l1 >= 0 (got {l1!r})")
    flagged = record.get("flagged")
    if not isinstance(flagged, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in flagged):
        raise bad("'flagged' must be a list of labels")
    outside = [t for t in flagged if t not in seen]
    if outside:
        raise bad(f"flagged label {outside[0]} was not scanned")
    for key in ("model", "settings", "test"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise bad(f"'{key}' must be an object")


def read_masks(path: Path) -> TriggerArrays:
    """A ``masks.npz``'s arrays, their shapes checked (pickled objects are refused)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels, masks, patterns = (np.asarray(npz[key]) for key in ("labels", "masks", "patterns"))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise NetcleanseError(f"cannot read {path} (needs arrays labels, masks, patterns): {exc}") from None
    if masks.ndim != 3 or patterns.ndim != 4 or not (len(labels) == len(masks) == len(patterns)) \
            or patterns.shape[2:] != masks.shape[1:]:
        raise NetcleanseError(f"{path}: expected labels (L,), masks (L,H,W), patterns (L,C,H,W); got "
                              f"{labels.shape}, {masks.shape}, {patterns.shape}")
    return TriggerArrays(labels.astype(int), masks, patterns)


def read_scan(directory) -> tuple[dict, TriggerArrays]:
    """A finished scan folder's ``scan.json`` record and ``masks.npz`` arrays."""
    d = require_scan_folder(directory)
    return read_scan_json(d / SCAN_JSON), read_masks(d / MASKS_NPZ)


def clear_scan(directory, keep_run: bool = False) -> None:
    """Remove a finished scan's files from ``directory`` before another is saved there: its trigger
    PNGs and (unless ``keep_run``) its run's resume key and journal. scan.json and masks.npz stay
    until :func:`write_scan` replaces them (atomically: an interrupted save keeps the old record)."""
    import shutil

    d = Path(directory)
    names = [] if keep_run else ["scan_settings.json", "progress.jsonl", "elapsed.json"]
    for name in names:
        (d / name).unlink(missing_ok=True)
    for png in list(d.glob("*_visualize_*_label_*.png")) + list((d / "triggers").glob("label_*_*.png")):
        png.unlink()
    if not keep_run and (d / "partial").is_dir():
        shutil.rmtree(d / "partial")


def write_scan_json(directory, record: dict) -> Path:
    """Write (or rewrite) ``record`` as the folder's ``scan.json``; the path written."""
    path = Path(directory) / SCAN_JSON
    write_json_atomic(path, record, indent=1)
    return path


def write_scan(directory, record: dict, masks: np.ndarray, patterns: np.ndarray, all_images: bool = False) -> Path:
    """Write a scan folder: ``masks.npz`` (rows aligned with ``record["labels"]``), the trigger PNGs
    of the flagged labels (of all labels with ``all_images``) and, last, ``scan.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    records = record["labels"]
    write_npz_atomic(d / MASKS_NPZ, labels=np.array([r["label"] for r in records], dtype=np.int64),
                     masks=masks.astype(np.float32), patterns=patterns.astype(np.float32))
    name = file_stem(record["model"].get("name") or "model")
    for i, rec in enumerate(records):
        if rec["flagged"] or all_images:
            _save_trigger_images(d, f"{name}_visualize_{{}}_label_{rec['label']}.png", masks[i], patterns[i])
        if rec["flagged"]:
            (d / "triggers").mkdir(exist_ok=True)
            _save_trigger_images(d / "triggers", f"label_{rec['label']}_{{}}.png", masks[i], patterns[i])
    write_scan_json(d, record)
    return d


def _to_image(array: np.ndarray, min_side: int = 160):
    from PIL import Image
    a = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
    scale = max(1, math.ceil(min_side / min(img.size)))
    return img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST) if scale > 1 else img


def _save_trigger_images(d: Path, template: str, mask: np.ndarray, pattern: np.ndarray) -> None:
    pattern_hwc = np.transpose(pattern, (1, 2, 0))
    _to_image(mask).save(d / template.format("mask"))
    _to_image(pattern_hwc).save(d / template.format("pattern"))
    _to_image(pattern_hwc * mask[..., None]).save(d / template.format("fusion"))
