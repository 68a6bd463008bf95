"""The module layout: no import cycles between netcleanse's modules (lazy imports inside functions
included), and the public imports that other code, the docs and notebooks use keep working."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import netcleanse

PACKAGE = Path(netcleanse.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("netcleanse",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The netcleanse modules ``name`` imports anywhere in its code (a package's own __init__ aside)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and modules[target].name != "__init__.py":
                targets.add(target)
    return targets


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items() if path.name != "__init__.py"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycle = trail[trail.index(target):] + [target] if target in trail else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# the workflows (CONTRIBUTING.md's layers): what sits below them never imports them
WORKFLOWS = ("netcleanse.scanning", "netcleanse.screening", "netcleanse.repair", "netcleanse.lab", "netcleanse.demo",
             "netcleanse.evaluate", "netcleanse.report", "netcleanse.cli")


@pytest.mark.parametrize("module", ["netcleanse.presets", "netcleanse.synthesis", "netcleanse.journal",
                                    "netcleanse.guard"])
def test_below_the_workflows(module):
    """The scan's parts moved out of scanning.py (presets, data-free inputs, the resume journal), and
    the guard that uses the data-free inputs, import no workflow: the scan imports them, not the
    other way round."""
    modules = _modules()
    up = sorted(target for target in _imports(module, modules[module], modules)
                if target in WORKFLOWS or target.startswith(tuple(f"{w}." for w in WORKFLOWS)))
    assert not up, f"{module} imports the workflows {up}"


@pytest.mark.parametrize("module, names", [
    ("netcleanse", "Classifier load_model save_model scan NetcleanseError build_architecture register_architecture "
                   "NetcleanseWarning Dataset load_data save_data Trigger ScanResult RepairResult Evaluation "
                   "screen ScreenResult"),
    ("netcleanse.model", "Classifier load_model checked_scale parse_input_shape output_classes HDF5_MAGIC ZIP_MAGIC"),
    ("netcleanse.keras", "KerasGraph load_keras load_keras_archive save_keras_weights graph_from_config "
                         "check_config keras_weights_to_module keras_layer_weights SUPPORTED_LAYERS _snake_case"),
    ("netcleanse.repair", "repair RepairResult RepairOptions METHODS scan_triggers concat"),
    ("netcleanse.guard", "GuardedClassifier TriggerFilter Disagreement trigger_filter disagreement_guard "
                         "logits_and_features synthetic_inputs"),
    ("netcleanse.torch_io", "save_model load_torch load_safetensors checkpoint is_safetensors EXTRA_FILE"),
    ("netcleanse.presets", "Stage Preset PRESETS"),
    ("netcleanse.synthesis", "smooth_noise synthesize_inputs INVERSION_STEPS INVERT_IMAGES"),
    # the scan's parts moved to their own modules stay importable from netcleanse.scanning
    ("netcleanse.scanning", "scan ScanResult parse_labels calibrated_inputs tested_margins record_margins label_margins "
                            "image_passes RULES FORMAT_VERSION MARGIN_IMAGES Stage Preset PRESETS smooth_noise "
                            "synthesize_inputs INVERSION_STEPS INVERT_IMAGES"),
])
def test_public_imports(module, names):
    imported = importlib.import_module(module)
    missing = [name for name in names.split() if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


def test_the_package_imports_its_api_on_first_use():
    """``import netcleanse`` does not import torch (the command answers Ctrl-C while it starts);
    every public name, and a submodule reached as an attribute, still works."""
    import subprocess
    import sys

    code = ("import sys, netcleanse; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(netcleanse.scan) and netcleanse.lab.__name__ == 'netcleanse.lab'; "
            "assert set(netcleanse.__all__) <= set(dir(netcleanse)); "
            "import pytest; pytest.raises(AttributeError, getattr, netcleanse, 'nothing')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "netcleanse", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Usage: netcleanse" in done.stdout


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    import sys
    import types

    import netcleanse.__main__ as entry

    class Starting(types.ModuleType):  # the command's modules still importing when Ctrl-C comes
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "netcleanse.cli", Starting("netcleanse.cli"))
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130 and capsys.readouterr().err == "interrupted\n"
