"""Where and how a scan writes while it runs: its out folder's lock, resume key and journal.

A scan given ``out`` (:func:`netcleanse.scanning.scan`) first checks the folder and records its
resume key in ``scan_settings.json`` (:func:`prepare_out`): the settings that decide the numbers
(not those of where and how it runs: device, threads, executor), the model's description and the
SHA-256 of its weights and preprocessing (:func:`weights_digest`) and of the clean images
(:func:`data_digest`); a resumed scan must match it. An exclusive lock (:func:`lock_folder`,
``.lock``) keeps two scans from writing one folder. The journal (:class:`Journal`) appends every
finished chunk of labels to ``progress.jsonl`` with its arrays in ``partial/``, written atomically, so an
interrupted scan redoes at most the chunks in flight and, reading finished chunks back from disk,
gives the same result as an uninterrupted one. The finished scan's own files are
:mod:`netcleanse.scan_folder`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from .data import Dataset
from .errors import NetcleanseError
from .utils import write_json_atomic, write_npz_atomic


class Journal:
    """Append-only record of finished chunks in the out dir (``progress.jsonl`` + ``partial/``)."""

    def __init__(self, out: Path | None):
        self.out = out
        self.done: dict[str, dict] = {}
        if out is not None and (out / "progress.jsonl").exists():
            for line in (out / "progress.jsonl").read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interruption: that chunk is simply redone
                if (out / "partial" / f"{entry['key']}.npz").exists():
                    self.done[entry["key"]] = entry
        self.memory: dict[str, tuple[dict, dict]] = {}
        # time spent by earlier, interrupted runs into the same folder (counted in elapsed_s)
        self.started = time.perf_counter()
        self.previous_elapsed = 0.0
        if out is not None and (out / "elapsed.json").exists():
            try:
                self.previous_elapsed = float(json.loads((out / "elapsed.json").read_text())["elapsed_s"])
            except (ValueError, KeyError):
                pass
        # an interrupted run's time counts too, chunks in flight included: written when the journal
        # goes (the interrupted scan's frame is dropped, or the process exits); a finished scan
        # calls close() first
        self._finalizer = (weakref.finalize(self, _write_elapsed, out, self.previous_elapsed, self.started)
                           if out is not None else None)

    def close(self) -> None:
        """The scan finished: its own elapsed time is in its result, not left to the journal."""
        if self._finalizer is not None:
            self._finalizer.detach()

    def get(self, key: str):
        if key in self.memory:
            return self.memory[key]
        if key in self.done:
            with np.load(self.out / "partial" / f"{key}.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return self.done[key], arrays
        return None

    def has(self, key: str) -> bool:
        return key in self.memory or key in self.done

    def put(self, key: str, entry: dict, arrays: dict) -> None:
        entry = dict(entry, key=key)
        if self.out is None:
            self.memory[key] = (entry, arrays)
            return
        (self.out / "partial").mkdir(exist_ok=True)
        write_npz_atomic(self.out / "partial" / f"{key}.npz", **arrays)
        with open(self.out / "progress.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = entry
        write_json_atomic(self.out / "elapsed.json",
                          {"elapsed_s": self.previous_elapsed + time.perf_counter() - self.started})
        # reload through disk so interrupted and uninterrupted scans continue from the same bits
        self.memory.pop(key, None)


def _write_elapsed(out: Path, previous: float, started: float) -> None:
    try:
        if out.is_dir():
            write_json_atomic(out / "elapsed.json", {"elapsed_s": previous + time.perf_counter() - started})
    except OSError:
        pass  # (a folder gone or read-only: only the time record is lost)


def lock_folder(out_dir: Path):
    """An exclusive lock on ``out_dir`` (``.lock``), so that two scans never write one folder;
    released when the returned file is closed or the process ends."""
    import fcntl
    handle = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise NetcleanseError(f"another netcleanse process is writing to {out_dir}; wait for it, or choose another "
                              "--out") from None
    return handle


def weights_digest(model) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes, bytes) and its preprocessing."""
    h = hashlib.sha256(repr(float(model.input_scale)).encode())
    if getattr(model, "mean", None) is not None:
        h.update(repr((tuple(model.mean), tuple(model.std))).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # flattened first: a 0-d tensor (BatchNorm's counter) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(data: Dataset) -> str:
    """SHA-256 of the clean images a scan optimises on (hashed in place: ``tobytes`` would copy a
    large set once more)."""
    array = data.x.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


# where and how a scan runs, not what it computes: a scan may be resumed elsewhere
_NOT_IN_RESUME_KEY = ("device", "torch_threads", "executor", "ray_address", "ray_cpus", "ray_gpus", "cpus_per_task",
                      "gpus_per_task")


def _same_but_data_path(before: dict, key: dict) -> bool:
    """Whether two resume keys differ only in the data's path, the data's SHA-256 being recorded
    and equal (a scan resumed from another folder names its data file another way)."""
    digest = key.get("model", {}).get("data_sha256")
    if digest is None or before.get("model") != key.get("model"):
        return False
    strip = lambda k: {**k.get("settings", {}), "data": None}  # noqa: E731
    return strip(before) == strip(key)


def prepare_out(out_dir: Path, resume: bool, settings: dict, model_info: dict) -> None:
    if out_dir.is_symlink() and not out_dir.exists():
        raise NetcleanseError(f"--out {out_dir} is a link to nothing; choose a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise NetcleanseError(f"--out {out_dir} is a file, not a folder")
    started = out_dir / "scan_settings.json"
    key = json.loads(json.dumps({"settings": {k: v for k, v in settings.items() if k not in _NOT_IN_RESUME_KEY},
                                 "model": model_info}))
    if resume:
        if not started.exists():
            if out_dir.exists() and any(out_dir.iterdir()):
                raise NetcleanseError(f"{out_dir} does not hold a scan to resume (no scan_settings.json)")
        else:
            before = json.loads(started.read_text())
            if _same_but_data_path(before, key):  # the same images named by another path: their digest decides
                return
            if before != key:
                diff = [k for k in key["settings"] if before.get("settings", {}).get(k) != key["settings"][k]]
                old_model = before.get("model", {})
                changed = [k for k in {**old_model, **key["model"]} if old_model.get(k) != key["model"].get(k)]
                # the weights' digest covers the preprocessing too: name that when it is what changed
                preprocessing = [k for k in ("input_scale", "mean", "std") if k in changed]
                what = (", ".join(diff) if diff else "the data's content" if changed == ["data_sha256"]
                        else f"the model's preprocessing: {', '.join(preprocessing)}" if preprocessing
                        else "the model's weights" if "weights_sha256" in changed else "the model")
                raise NetcleanseError(f"cannot resume {out_dir}: it was started with different settings ({what}); "
                                      f"to start afresh, remove that folder or choose another --out")
            return
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise NetcleanseError(f"{out_dir} is not empty; use --resume to continue a scan there, "
                              "or choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started, key, indent=1)
