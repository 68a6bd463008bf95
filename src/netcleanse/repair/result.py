"""The outcome of a repair, :class:`RepairResult`, and its one writer (``repair.json`` and the models)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NetcleanseError
from ..classifier import Classifier
from ..torch_io import save_model
from ..utils import write_json_atomic


@dataclass
class RepairResult:
    model: Classifier  # the repaired (weights) or guarded (N+1) classifier
    method: str
    table: list[dict]
    curve: list[dict] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    saved: dict[str, Classifier] = field(default_factory=dict)  # extra models to write (file stem -> model)
    elapsed_s: float = 0.0
    result_row: str | None = None  # the table row (its "model") that measures ``model``

    def before_after(self) -> tuple[dict, dict] | None:
        """The test-set measurements (clean accuracy, attack success, and for a guard the detection
        and false-positive rates) of the original model and of the result: the table's "original"
        row and ``result_row`` (its ``*_after_fine_tuning`` figures where the model was fine-tuned:
        those measure the model returned); None without test sets."""
        rows = {row.get("model"): row for row in self.table}
        keys = ("clean_accuracy", "attack_success", "poison_detection", "false_positive")
        before, after = rows.get("original"), rows.get(self.result_row)
        if after is not None:
            after = {k: after.get(f"{k}_after_fine_tuning", after.get(k)) for k in keys}
        if before is None or after is None or not any(after.get(k) is not None for k in keys[:2]):
            return None
        return ({k: before[k] for k in keys if before.get(k) is not None},
                {k: after[k] for k in keys if after.get(k) is not None})

    def to_dict(self) -> dict:
        record = {"method": self.method, "flagged": self.flagged, "settings": self.settings,
                  "model": {"name": self.model.name, "num_classes": self.model.num_classes,
                            "poison_label": self.model.poison_label},
                  "table": self.table, "curve": self.curve, "elapsed_s": self.elapsed_s}
        measured = self.before_after()
        if measured is not None:  # the report's "before -> after" line
            record["before"], record["after"] = measured
        return record

    def save(self, folder, force: bool = False) -> Path:
        """Write ``repair.json`` and the model files into ``folder``; refuse to overwrite unless ``force``.
        A repair replaced with ``force`` leaves none of its model files behind (a stale
        ``repaired.pt`` beside a new ``guarded.pt`` would be mistaken for this repair's)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NetcleanseError(f"--out {folder} exists and is not a folder")
        if (folder / "repair.json").exists() and not force:
            raise NetcleanseError(f"{folder} already holds a repair (repair.json); choose another --out or use --force")
        models = {("guarded" if self.model.poison_label is not None else "repaired"): self.model, **self.saved}
        # every file this writes, checked before the first is written (the input model may live there)
        taken = [name for stem in models for name in (f"{stem}.pt", f"{stem}.h5") if (folder / name).exists()]
        if taken and not force:
            raise NetcleanseError(f"{folder / taken[0]} exists; choose another --out or use --force to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        files, notes = {}, {}
        for stem, model in models.items():
            files[stem] = [save_model(model, folder / f"{stem}.pt").name]
            if model.poison_label is None:
                try:
                    files[stem].append(save_model(model, folder / f"{stem}.h5").name)
                except NetcleanseError as exc:  # e.g. a TorchScript net: no Keras layout to write
                    notes[stem] = f"no .h5 export: {exc}"
        earlier = _files_of(folder / "repair.json") if force else []
        record = dict(self.to_dict(), files=files, notes=notes)
        write_json_atomic(folder / "repair.json", record, indent=2)
        written = {name for names in files.values() for name in names}
        for name in earlier:
            if name not in written:
                (folder / name).unlink(missing_ok=True)
        return folder


def _files_of(record_path: Path) -> list[str]:
    """The model files an earlier ``repair.json`` lists (plain names in its folder; nothing else)."""
    try:
        listed = json.loads(record_path.read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return []
    names = [n for names in listed.values() if isinstance(names, list) for n in names] \
        if isinstance(listed, dict) else []
    return [n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith((".pt", ".h5"))]
