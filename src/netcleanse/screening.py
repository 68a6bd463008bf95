"""Screen many models: one scan (and report) per model, one summary table and page for all.

:func:`screen` scans every :class:`ScreenEntry` (a model file with its own architecture, input
scale, clean data or data-free, labels) with the same scan settings, and writes into ``out``::

    models/<name>/      the model's scan (scan.json, masks.npz, images) and report.html
    screen.csv          one row per model: name, model, verdict, flagged labels, model-level
    screen.json         p-value, labels scanned, seconds, report, error (if any)
    index.html          the table, linking each model's report
    screen_settings.json  what the screen was started with (checked by ``resume``)

A model that cannot be loaded or scanned (a bad file, data of the wrong shape, a NaN model) gives
a row with its ``error``; the other models go on. With ``resume``, a model whose folder holds a
finished scan is not scanned again (a model that failed is tried again); locally, a model scan
that was interrupted continues from its own journal.

Models run through an executor (:mod:`netcleanse.executor`): locally one after another, or on Ray
one model per task (the worker reads the model and data files, so on a cluster their paths must
be readable there, e.g. on a shared file system; results come back through Ray and this process
writes every folder). Each model's scan is the ordinary :func:`netcleanse.scan` with the same
seed, so its result is the one ``netcleanse scan`` gives.

Manifests (:func:`read_manifest`) are CSV with a header row, or JSON (a list of objects, or
``{"models": [...]}``), with the fields of :class:`ScreenEntry`; relative paths are relative to
the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import NetcleanseError
from .executor import Executor, LocalExecutor
from .classifier import checked_scale
from .progress import progress_bar
from .utils import atomic_write, file_stem, first_line, resolve_device, spreadsheet_safe, write_json_atomic

ROW_FIELDS = ("name", "model", "verdict", "flagged", "p_value", "labels", "time_s", "report", "error")
_TRUE, _FALSE = {"1", "true", "yes", "y"}, {"0", "false", "no", "n", ""}
_TEXT_FIELDS = ("name", "model", "verdict", "report", "error")  # free text, from file names and messages


@dataclass(frozen=True)
class ScreenEntry:
    """One model to screen. ``model``: its file. ``name``: its folder and row name (default the
    file's stem). ``arch``, ``input_scale``, ``mean``, ``std``, ``arch_kwargs``, ``num_classes``,
    ``input_shape``: as for :func:`netcleanse.load_model` (and the command line's model options).
    Exactly one of ``data`` (a clean-data file or folder) and ``data_free``. ``labels``: e.g. "0-9"
    (default all)."""

    model: str
    name: str | None = None
    arch: str | None = None
    input_scale: float = 1.0
    data: str | None = None
    data_free: bool = False
    labels: str | None = None
    mean: str | None = None
    std: str | None = None
    arch_kwargs: str | None = None
    num_classes: int | None = None
    input_shape: str | None = None


FIELDS = tuple(f.name for f in fields(ScreenEntry))


def make_entries(models, *, arch: str | None = None, input_scale: float = 1.0, data=None, data_free: bool = False,
                 labels=None, **model_options) -> list[ScreenEntry]:
    """Entries for model files that share one set of options (``netcleanse screen MODEL...``);
    ``data``: a clean-data file or folder; ``labels``: "0,5,7-9" or a list of label numbers;
    ``model_options``: mean, std, arch_kwargs, num_classes, input_shape."""
    if isinstance(models, (str, Path)):  # one path would be read as its characters
        raise NetcleanseError(f"models is a list of model files, got the single path {str(models)!r}: "
                              "give [path]")
    scale = _number(input_scale, "--input-scale")
    if data is not None and not isinstance(data, (str, Path)):
        raise NetcleanseError("a screen's data is a clean-data file or folder (each model's scan reads it); "
                              f"got a {type(data).__name__}")
    if labels is not None and not isinstance(labels, str):
        try:
            labels = ",".join(str(int(t)) for t in labels)  # a list of labels, as scan() takes
        except (TypeError, ValueError):
            raise NetcleanseError(f"labels must be a list like \"0,5,7-9\" or of label numbers, got {labels!r}") from None
    entries = [_checked(ScreenEntry(str(m), None, arch, scale, None if data is None else str(data), data_free, labels,
                                    **_shared_options(m, arch, model_options)), f"model {m}") for m in models]
    _check_shape_used(entries, model_options.get("input_shape"))
    return entries


def _shared_options(model, arch, options: dict) -> dict:
    """The model options given for many models, less an ``input_shape`` for a Keras file without
    an architecture that records its input size: one default ``--input-shape`` serves a zoo of
    Keras and ONNX/TorchScript models (and fully convolutional Keras ones)."""
    options = dict(options)
    if arch is None and options.get("input_shape") is not None:
        from .keras.load import input_size_open
        if input_size_open(model) is False:  # (None: not a Keras file)
            options["input_shape"] = None
    return options


def _check_shape_used(entries: list[ScreenEntry], input_shape) -> None:
    if input_shape is not None and entries and all(e.input_shape is None for e in entries):
        raise NetcleanseError("--input-shape concerns none of the models: their Keras files record their input shape")


def read_manifest(path, *, arch: str | None = None, input_scale: float | None = None, data=None,
                  data_free: bool = False, labels: str | None = None, **model_options) -> list[ScreenEntry]:
    """The entries of a CSV or JSON manifest (see the module doc). The keyword arguments are
    defaults for rows that leave a field out or empty (a row's ``data`` or ``data_free`` replaces
    both defaults; ``model_options``: mean, std, arch_kwargs, num_classes, input_shape). Unknown fields, rows without a model, and rows with neither or both of data
    and data_free are refused, naming the row."""
    path = Path(path)
    if not path.is_file():
        raise NetcleanseError(f"manifest not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise NetcleanseError(f"{path}: not valid JSON ({first_line(exc)})") from None
        rows = raw.get("models") if isinstance(raw, dict) else raw
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise NetcleanseError(f"{path}: a JSON manifest is a list of objects, or {{\"models\": [...]}}")
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None:
            raise NetcleanseError(f"{path}: empty manifest (a header row with a 'model' column is expected)")
        rows = list(reader)
        if any(None in r for r in rows):
            raise NetcleanseError(f"{path}: a row has more cells than the header")
    if not rows:
        raise NetcleanseError(f"{path}: the manifest lists no models")
    entries = []
    for n, row in enumerate(rows, 1):
        where = f"{path} row {n}"
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise NetcleanseError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
        value = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        value = {k: v for k, v in value.items() if v not in (None, "")}
        if "model" not in value:
            raise NetcleanseError(f"{where}: no model file given")
        # a row's data, or data_free=true, replaces the defaults; data_free=false alone asks for
        # the default data (an error without one)
        own_data = "data" in value or ("data_free" in value and _boolean(value["data_free"], where))
        if isinstance(value.get("labels"), list):  # JSON: [0, 1, 5] as "0,1,5"
            value["labels"] = ",".join(str(v) for v in value["labels"])
        model = _relative_to(path, value["model"])
        row_arch = str(value.get("arch", arch)) if value.get("arch", arch) is not None else None
        entry = ScreenEntry(
            model=str(model),
            name=str(value["name"]) if "name" in value else None,
            arch=row_arch,
            input_scale=_number(value.get("input_scale", 1.0 if input_scale is None else input_scale), where),
            data=(str(_relative_to(path, value["data"])) if "data" in value
                  else None if own_data or data is None else str(data)),
            data_free=(_boolean(value["data_free"], where) if "data_free" in value
                       else False if own_data else data_free),
            labels=str(value.get("labels", labels)) if value.get("labels", labels) is not None else None,
            **{k: _model_option(k, v, where) for k, v in _row_options(value, model, row_arch, model_options).items()})
        entries.append(_checked(entry, where))
    _check_shape_used(entries, model_options.get("input_shape"))
    return entries


_MODEL_OPTIONS = ("mean", "std", "arch_kwargs", "num_classes", "input_shape")


def _row_options(row: dict, model, arch, defaults: dict) -> dict:
    """A manifest row's model options: its own, else the defaults that concern its model."""
    shared = _shared_options(model, arch, {k: defaults.get(k) for k in _MODEL_OPTIONS})
    return {k: row[k] if k in row else shared[k] for k in _MODEL_OPTIONS}


def _model_option(key: str, value, where: str):
    """A manifest's model option as :func:`netcleanse.load_model` takes it (checked there)."""
    if value is None:
        return None
    if key == "num_classes":
        try:
            number = int(str(value))
        except ValueError:
            number = 0
        if number < 1:
            raise NetcleanseError(f"{where}: num_classes must be a positive whole number, got {value!r}")
        return number
    if key == "arch_kwargs" and isinstance(value, dict):
        return json.dumps(value)
    if key in ("mean", "std") and isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _relative_to(manifest: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else manifest.parent / p


def _number(value, where: str) -> float:
    try:
        return checked_scale(value)
    except NetcleanseError:
        raise NetcleanseError(f"{where}: input_scale must be a positive number, got {value!r}") from None


def _boolean(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise NetcleanseError(f"{where}: data_free must be true or false, got {value!r}")


def _checked(entry: ScreenEntry, where: str) -> ScreenEntry:
    from .scanning import label_ranges
    if (entry.data is None) == (not entry.data_free):
        raise NetcleanseError(f"{where}: give exactly one of data (a clean-data file or folder) and data_free")
    if entry.labels is not None:
        try:
            label_ranges(entry.labels)  # the syntax, before any scan (the range needs each model)
        except NetcleanseError as exc:
            raise NetcleanseError(f"{where}: {exc}") from None
    return entry


# ----------------------------------------------------------------------------------------------


@dataclass
class ScreenResult:
    """The rows of a screen (one dict per entry, in the entries' order; fields :data:`ROW_FIELDS`)
    and where they were written."""

    rows: list[dict]
    out: Path
    elapsed_s: float

    @property
    def counts(self) -> dict:
        """How many models got each verdict ("error" for the failed ones)."""
        out: dict[str, int] = {}
        for row in self.rows:
            key = "error" if row["error"] and row["verdict"] is None else row["verdict"]
            out[key] = out.get(key, 0) + 1
        return out


def screen(entries: list[ScreenEntry], out, *, preset: str = "fast", rule: str = "calibrated", alpha: float = 0.05,
           threshold: float = 2.0, seed: int = 0, resume: bool = False, device: str = "cpu",
           executor: Executor | None = None, progress: bool = True, report: bool = True) -> ScreenResult:
    """Scan every entry with the same settings (those of :func:`netcleanse.scan`) and write the
    per-model folders, ``screen.csv``, ``screen.json`` and ``index.html`` into ``out`` (see the
    module doc). A non-empty ``out`` is refused unless ``resume``; resuming with other settings or
    other entries is refused. ``report``: also render each model's report.html."""
    from .journal import lock_folder
    from .presets import PRESETS
    from .scanning import check_decision
    started = time.perf_counter()
    if isinstance(entries, (str, Path)) or not all(isinstance(e, ScreenEntry) for e in entries):
        raise NetcleanseError("screen() takes a list of ScreenEntry (make_entries([...]) or read_manifest(...) "
                              "make them)")
    if not entries:
        raise NetcleanseError("no models to screen")
    # settings every model would refuse are refused once, here, not as a row per model
    resolve_device(device)
    if preset not in PRESETS:
        raise NetcleanseError(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")
    check_decision(rule, alpha, threshold)
    missing = next((e.data for e in entries if e.data is not None and not Path(e.data).exists()), None)
    if missing is not None:
        raise NetcleanseError(f"data not found: {missing}")
    # the work and the resume key name the files by absolute paths (the model, its data, an
    # architecture's FILE.py): workers run in other folders (a Ray worker would read FILE.py from its
    # own), and a resume may start elsewhere; the summary shows them as given
    placed = [_absolute(e) for e in entries]
    out = Path(out)
    folders, taken = [], set()
    for entry in entries:
        base = _short(file_stem(entry.name or Path(entry.model).stem))
        folder, k = base, 2
        while folder.lower() in taken:  # deterministic: the same entries always get the same folders
            folder, k = f"{base}_{k}", k + 1
        taken.add(folder.lower())
        folders.append(folder)
    settings = {"preset": preset, "rule": rule, "alpha": float(alpha), "threshold": float(threshold),
                "seed": int(seed), "entries": [asdict(e) for e in placed]}
    _prepare(out, resume, settings)
    lock = lock_folder(out)
    executor = executor or LocalExecutor()
    in_process = isinstance(executor, LocalExecutor)
    rows: list[dict | None] = [None] * len(entries)
    todo = []
    for i, (entry, folder) in enumerate(zip(entries, folders)):
        if (out / "models" / folder / "scan.json").is_file():
            try:
                rows[i] = _finished_row(entry, folder, out, report)
                continue
            except NetcleanseError as exc:  # unreadable: scan it again, its folder kept aside
                _set_aside(out / "models" / folder, first_line(exc))
        todo.append(i)
    shared = {"preset": preset, "rule": rule, "alpha": float(alpha), "threshold": float(threshold), "seed": int(seed),
              "device": device, "out": str(out.resolve()) if in_process else None}
    jobs = [(placed[i], folders[i]) for i in todo]
    bar = progress_bar(disable=None if progress else True)
    try:
        with bar:
            task = bar.add_task(f"screen: {len(entries)} model{'' if len(entries) == 1 else 's'}",
                                total=len(entries), completed=len(entries) - len(todo))
            for j, outcome in executor.map(_screen_one, shared, jobs, failures=True):
                i = todo[j]
                # a task that failed in the executor (its worker died, say) is that model's error row
                result, error, seconds = (None, first_line(outcome), None) if isinstance(outcome, Exception) \
                    else outcome
                rows[i] = _row(entries[i], folders[i], out, result, error, seconds, in_process)
                if report and rows[i]["verdict"] is not None:  # (the row stands before: an interrupted
                    # rendering leaves it in the summary, and a resume renders the report)
                    rows[i]["report"], rows[i]["error"] = _render(out / "models" / folders[i], out)
                _write_summary(out, rows, settings, folders, [e.model for e in entries])
                bar.advance(task)
    finally:
        try:  # also when interrupted: the summary shows every model finished so far
            _write_summary(out, rows, settings, folders, [e.model for e in entries])
        finally:
            lock.close()
    return ScreenResult(rows=rows, out=out, elapsed_s=round(time.perf_counter() - started, 3))


FOLDER_BYTES = 100  # a model's folder name at most (file systems allow 255 bytes; the suffix _2 and links need room)


def _short(name: str) -> str:
    """``name`` cut to at most :data:`FOLDER_BYTES` bytes of UTF-8 (a whole character at a time)."""
    while len(name.encode("utf-8")) > FOLDER_BYTES:
        name = name[:-1]
    return name


def _absolute(entry: ScreenEntry) -> ScreenEntry:
    from dataclasses import replace
    from .archspec import absolute_arch
    return replace(entry, model=str(Path(entry.model).expanduser().resolve()),
                   data=None if entry.data is None else str(Path(entry.data).expanduser().resolve()),
                   arch=None if entry.arch is None else absolute_arch(entry.arch))


def _prepare(out: Path, resume: bool, settings: dict) -> None:
    if out.exists() and not out.is_dir():
        raise NetcleanseError(f"--out {out} is a file, not a folder")
    started = out / "screen_settings.json"
    key = json.loads(json.dumps(settings))
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise NetcleanseError(f"{out} is not empty; use --resume to continue a screen there, "
                                  "or choose an empty folder")
        if not started.is_file():
            raise NetcleanseError(f"{out} does not hold a screen to resume (no screen_settings.json)")
        before = json.loads(started.read_text())
        if before != key:
            what = [k for k in key if k != "entries" and before.get(k) != key[k]]
            if "entries" in key and before.get("entries") != key["entries"]:
                old, new = before.get("entries") or [], key["entries"]
                if len(old) != len(new) or [e.get("model") for e in old] != [e.get("model") for e in new]:
                    what.append("models")
                else:  # the same models with other per-model settings: name them
                    what += sorted({f for a, b in zip(old, new) for f in set(a) | set(b) if a.get(f) != b.get(f)})
            raise NetcleanseError(f"cannot resume {out}: it was started with different settings ({', '.join(what)})")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started, key, indent=1)


def _screen_one(shared: dict, job, progress) -> tuple:
    """Load and scan one model (wherever the executor runs it): (ScanResult or None, error or None,
    seconds). Locally the scan writes (and resumes) its own folder; elsewhere the caller saves it."""
    from .data import load_data
    from .model import load_model
    from .scanning import parse_labels, scan
    entry, folder = job
    t = time.perf_counter()
    try:
        model = load_model(entry.model, arch=entry.arch, input_scale=entry.input_scale,
                           name=entry.name or Path(entry.model).stem, mean=entry.mean, std=entry.std,
                           arch_kwargs=entry.arch_kwargs, num_classes=entry.num_classes,
                           input_shape=entry.input_shape)
        data = None
        if entry.data is not None:
            data = load_data(entry.data, expect_shape=model.input_shape, num_classes=model.num_classes)
        target = None if shared["out"] is None else Path(shared["out"]) / "models" / folder
        result = scan(model, data, data_free=entry.data_free, labels=parse_labels(entry.labels, model.num_classes),
                      preset=shared["preset"], rule=shared["rule"], alpha=shared["alpha"],
                      threshold=shared["threshold"], seed=shared["seed"], device=shared["device"], out=target,
                      resume=True, progress=False, data_name=entry.data)
    except (NetcleanseError, OSError) as exc:
        return None, first_line(exc), time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - one model's bug must not end a screen of hundreds
        return None, f"{type(exc).__name__}: {first_line(exc)}", time.perf_counter() - t
    return result, None, time.perf_counter() - t


def _row(entry: ScreenEntry, folder: str, out: Path, result, error, seconds, saved: bool) -> dict:
    row = {"name": folder, "model": entry.model, "verdict": None, "flagged": [], "p_value": None, "labels": None,
           "time_s": None if seconds is None else round(float(seconds), 3), "report": None, "error": error}
    if result is None:
        return row
    target = out / "models" / folder
    try:
        if not saved:
            result.save(target, force=True)  # the screen's own folder for this model
    except (NetcleanseError, OSError) as exc:
        row["error"] = first_line(exc)
        return row
    # the scan's own time (resumed runs' parts added up), as a finished folder's row reads it back
    row.update(verdict=result.verdict, flagged=list(result.flagged), p_value=result.p_value,
               labels=len(result.labels), time_s=result.elapsed_s)
    return row


def _set_aside(folder: Path, why: str) -> None:
    """Rename a model folder whose scan.json cannot be read to ``<name>.unreadable-N`` (nothing is
    deleted), so that the model is scanned again in a fresh folder, and say so."""
    import warnings
    from .errors import NetcleanseWarning
    n = 1
    while (aside := folder.with_name(f"{folder.name}.unreadable-{n}")).exists():
        n += 1
    folder.rename(aside)
    warnings.warn(f"{folder}: its scan.json cannot be read ({why}); the folder is kept as {aside.name} and the "
                  "model is scanned again", NetcleanseWarning, stacklevel=3)


def _finished_row(entry: ScreenEntry, folder: str, out: Path, report: bool) -> dict:
    from .scanning import ScanResult
    target = out / "models" / folder
    result = ScanResult.load(target)
    row = {"name": folder, "model": entry.model, "verdict": result.verdict, "flagged": list(result.flagged),
           "p_value": result.p_value, "labels": len(result.labels), "time_s": result.elapsed_s, "report": None,
           "error": None}
    if report:
        if (target / "report.html").is_file():
            row["report"] = f"models/{folder}/report.html"
        else:
            row["report"], row["error"] = _render(target, out)
    return row


def _render(target: Path, out: Path) -> tuple[str | None, str | None]:
    from .report import render_report
    try:
        return render_report(target).relative_to(out).as_posix(), None
    except NetcleanseError as exc:
        return None, f"report: {first_line(exc)}"


def _write_summary(out: Path, rows: list, settings: dict, folders: list[str], models: list[str]) -> None:
    done = [r for r in rows if r is not None]
    write_json_atomic(out / "screen.json", {"format": "netcleanse-screen", "version": 1, "models": len(rows),
                                            "finished": len(done), "settings": {k: v for k, v in settings.items()
                                                                                if k != "entries"},
                                            "rows": done}, indent=1)
    with atomic_write(out / "screen.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            for r in done:
                row = dict(r, flagged=" ".join(str(t) for t in r["flagged"]),
                           p_value="" if r["p_value"] is None else f"{r['p_value']:.4g}", error=r["error"] or "")
                writer.writerow({k: spreadsheet_safe(row[k]) if k in _TEXT_FIELDS else row[k] for k in ROW_FIELDS})
    with atomic_write(out / "index.html") as tmp:
        tmp.write_text(_page(rows, settings, folders, models), encoding="utf-8")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>netcleanse screen: {{ rows|length }} models</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;
padding:.3em .6em;text-align:left}.backdoor-detected{background:#fdd}.error{background:#eee;color:#a00}
.inconclusive{background:#ffd}</style></head><body>
<h1>Screen of {{ rows|length }} models</h1>
<p>{{ finished }} finished; preset {{ settings.preset }}, rule {{ settings.rule }}{% if settings.rule == "calibrated" %}
(alpha {{ settings.alpha }}){% else %} (threshold {{ settings.threshold }}){% endif %}, seed {{ settings.seed }}.
{% for verdict, n in counts %}{{ verdict }}: {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}</p>
<table><tr><th>model</th><th>verdict</th><th>flagged labels</th><th>model p-value</th><th>labels</th>
<th>time (s)</th><th>file</th><th>error</th></tr>
{% for r in rows %}<tr class="{{ r.verdict or ('error' if r.error else '') }}">
<td>{% if r.report %}<a href="{{ r.report|urlencode }}">{{ r.name }}</a>{% else %}{{ r.name }}{% endif %}</td>
<td>{{ r.verdict or ("error" if r.error else "not yet scanned") }}</td><td>{{ r.flagged|join(", ") }}</td>
<td>{{ "%.3g"|format(r.p_value) if r.p_value is not none else "" }}</td>
<td>{{ r.labels if r.labels is not none else "" }}</td>
<td>{{ "%.1f"|format(r.time_s) if r.time_s is not none else "" }}</td><td>{{ r.model }}</td>
<td>{{ r.error or "" }}</td></tr>
{% endfor %}</table></body></html>
"""


def _page(rows: list, settings: dict, folders: list[str], models: list[str]) -> str:
    """The summary page; every string is HTML-escaped (names and errors come from users' files)."""
    from jinja2 import Environment
    shown = [r if r is not None else {"name": folder, "model": model, "verdict": None, "flagged": [], "p_value": None,
                                      "labels": None, "time_s": None, "report": None, "error": None}
             for r, folder, model in zip(rows, folders, models)]
    counts: dict[str, int] = {}
    for r in rows:
        if r is not None:
            key = r["verdict"] or "error"
            counts[key] = counts.get(key, 0) + 1
    template = Environment(autoescape=True).from_string(_PAGE)
    return template.render(rows=shown, settings=settings, finished=sum(r is not None for r in rows),
                           counts=sorted(counts.items()))
