"""The documentation is checked like code: its examples run (fences marked ``python run`` and ``sh
run``, in a copy of the files tests/docs_workspace.py makes, and ``console run`` transcripts, whose
output must be what the page shows) or say why they cannot, every command-line option is documented
in docs/cli.md, and every link between the documents resolves (files and #anchors)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from netcleanse.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "SECURITY.md", ROOT / "CONTRIBUTING.md",
         ROOT / "benchmarks" / "RESULTS.md", *DOCS]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+)$", text, re.M)}


def test_docs_folder_has_the_pages_the_readme_maps():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "the README is the first screen and a map; explanations go to docs/"
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not linked from the README"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"broken links in {page.name}: {broken}"


def _commands():
    group = typer.main.get_command(app)
    return sorted(group.commands.items())


def test_every_cli_option_is_documented():
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    missing = []
    for name, command in _commands():
        if not re.search(rf"^## `netcleanse {re.escape(name)}\b", cli_doc, re.M):
            missing.append(f"section for `netcleanse {name}`")
        section = re.split(rf"^## `netcleanse {re.escape(name)}\b", cli_doc, flags=re.M)[-1].split("\n## ")[0]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help" and f"`{opt}" not in section and f"`{opt}" not in cli_doc.split("\n## ")[0]:
                    missing.append(f"netcleanse {name} {opt}")
    assert not missing, f"not documented in docs/cli.md: {missing}"


# What a fence's info string may say. Runnable: ``python run``, ``sh run`` (each command must exit 0)
# and ``console run`` (a transcript: the output must be what the page shows), optionally ``slow`` (run
# by the slow suite, which CI runs too) and ``requires=a,b`` (Python modules, or ``!program``; the
# example is skipped where one is missing). Not run, each for a stated reason: ``text`` (a synopsis
# or an output), ``csv``/``json`` (a file's layout), ``sh setup`` (installing, make targets, starting
# a cluster), ``sh cluster`` (needs a Ray cluster's address), ``sh long`` (a benchmark of hours).
NOT_RUN = {"text", "csv", "json", "sh setup", "sh cluster", "sh long"}
RUNNABLE = ("python", "sh", "console")
EXAMPLE_PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS]


def _runnable(lang: str, slow: bool) -> list[tuple]:
    """(page, index, body, requirements) of the ``LANG run`` fences with or without ``slow``."""
    found = []
    for page in EXAMPLE_PAGES:
        i = 0
        for tag, body in FENCE.findall(page.read_text()):
            words = tag.split()
            if words[:2] != [lang, "run"]:
                continue
            if ("slow" in words) == slow:
                requires = [r for w in words if w.startswith("requires=") for r in w[9:].split(",")]
                found.append((page, i, body, requires))
            i += 1
    return found


def test_every_example_is_run_or_says_why_not():
    """Each fence is a runnable example or one of the kinds that are not run, for a stated reason."""
    odd = []
    for page in EXAMPLE_PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            tag = " ".join(match.group(1).split())
            words = tag.split()
            if not (words[:2] in ([k, "run"] for k in RUNNABLE) or tag in NOT_RUN):
                odd.append(f"{page.name}:{text[:match.start()].count(chr(10)) + 1} ```{tag}")
    assert not odd, f"fences neither run nor marked as not runnable: {odd}"


@pytest.fixture(scope="session")
def examples_folder(tmp_path_factory):
    """The examples' files (tests/docs_workspace.py), built once."""
    import docs_workspace
    return docs_workspace.build(tmp_path_factory.mktemp("docs") / "files")


def _beside_shared(tmp_path: Path, text: str, files: Path | None = None, requires=()) -> Path:
    """A working folder (a copy of ``files``, or empty) beside which ``../shared`` is the checkout's;
    skips the test when ``text``, an example, needs ../shared/csaw and it is absent, or when one of
    ``requires`` is missing."""
    import docs_workspace
    missing = docs_workspace.requirement_missing(list(requires))
    if missing:
        pytest.skip(f"the example needs {missing}, not available here")
    shared = ROOT.parent / "shared"
    if "../shared" in text and not (shared / "csaw").is_dir():
        pytest.skip("../shared/csaw is not present")
    (tmp_path / "shared").symlink_to(shared)
    work = tmp_path / "work"
    if files is None:
        work.mkdir()
    else:
        shutil.copytree(files, work)
    return work


def _env(threads: int) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "COLUMNS": "80", "NO_COLOR": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}


def _run_python(page: Path, index: int, code: str, work: Path, threads: int) -> str:
    """Run one Python example as written in ``work``; it must exit cleanly, and each ``print(...)  #
    text`` must print a line starting with that text up to its last word (the last word, a measured
    number, may differ in its digits)."""
    script = f"import torch; torch.set_num_threads({threads})\n" + code
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=_env(threads), capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, f"{page.name} example {index} failed:\n{done.stderr[-3000:]}"
    printed = done.stdout.splitlines()
    for i, line in enumerate(re.findall(r"^print\(.*$", code, re.M)):  # one line printed per print(...)
        comment = re.search(r"\)\s+# (.+)$", line)
        if comment:
            text = comment.group(1).rsplit(" ", 1)[0]
            assert i < len(printed) and printed[i].startswith(text), \
                f"{page.name} example {index}: printed {printed[i] if i < len(printed) else None!r}, the page shows {text!r}"
    return done.stdout


def _commands_of(body: str) -> list[str]:
    """The commands of a ``sh run`` fence: its lines, a trailing backslash continuing one, comment
    and blank lines left out (a comment after a command is bash's own)."""
    commands, current = [], ""
    for line in body.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line
        if line.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(current)
        current = ""
    return commands


def _run_sh(page: Path, index: int, body: str, work: Path, threads: int) -> None:
    for command in _commands_of(body):
        done = subprocess.run(["bash", "-c", command], cwd=work, env=_env(threads), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=1200)
        assert done.returncode == 0, f"{page.name} sh example {index}: `{command}` failed:\n{done.stdout[-3000:]}"


def _ids(v):
    return v.name if isinstance(v, Path) else str(v)[:0]


@pytest.mark.parametrize("page,index,code,requires", _runnable("python", slow=False), ids=_ids)
def test_python_examples_run(page, index, code, requires, tmp_path, examples_folder):
    """Fences marked ``python run`` run as written, in a copy of the examples' files, and must exit cleanly."""
    _run_python(page, index, code, _beside_shared(tmp_path, code, examples_folder, requires), threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("page,index,code,requires", _runnable("python", slow=True), ids=_ids)
def test_slow_python_examples_run(page, index, code, requires, tmp_path, examples_folder):
    """Fences marked ``python run slow`` (e.g. a full scan of a CSAW net) run as written, with 2 threads."""
    _run_python(page, index, code, _beside_shared(tmp_path, code, examples_folder, requires), threads=2)


@pytest.mark.parametrize("page,index,body,requires", _runnable("sh", slow=False), ids=_ids)
def test_shell_examples_run(page, index, body, requires, tmp_path, examples_folder):
    """Fences marked ``sh run``: each command runs (bash, the venv's ``netcleanse`` first on PATH) in
    a copy of the examples' files, in order, and exits 0."""
    _run_sh(page, index, body, _beside_shared(tmp_path, body, examples_folder, requires), threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("page,index,body,requires", _runnable("sh", slow=True), ids=_ids)
def test_slow_shell_examples_run(page, index, body, requires, tmp_path, examples_folder):
    """Fences marked ``sh run slow`` (trainings, full scans) run like ``sh run``, with 2 threads."""
    _run_sh(page, index, body, _beside_shared(tmp_path, body, examples_folder, requires), threads=2)


def _transcript(body: str) -> list[tuple[str, list[str]]]:
    """A ``console run`` fence as (command, expected output lines): a command is a line starting with
    ``$ `` (continued by a trailing backslash); the lines up to the next command are its output."""
    steps: list[tuple[str, list[str]]] = []
    lines = body.rstrip("\n").split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise AssertionError(f"console fence: output before any command: {lines[i]!r}")
        command = [lines[i][2:]]
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        output = []
        while i + 1 < len(lines) and not lines[i + 1].startswith("$ "):
            i += 1
            output.append(lines[i].rstrip())
        steps.append(("\n".join(command), output))
        i += 1
    return steps


TRANSCRIPTS = [(page, i, body) for page, i, body, _ in _runnable("console", slow=False)]


@pytest.mark.parametrize("page,index,body", TRANSCRIPTS, ids=_ids)
def test_console_examples_print_what_the_docs_show(page, index, body, tmp_path):
    """Fences marked ``console run`` are real sessions: each ``$`` command runs (bash, the venv's
    ``netcleanse`` first on PATH) in an empty folder beside which ``../shared`` is the checkout's, and
    prints exactly the lines shown after it (trailing spaces aside). Only cheap commands belong there."""
    work = _beside_shared(tmp_path, body)
    for command, expected in _transcript(body):
        done = subprocess.run(["bash", "-c", command], cwd=work, env=_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)  # one stream, in order
        printed = [line.rstrip() for line in done.stdout.rstrip("\n").split("\n")] if done.stdout.strip() else []
        assert done.returncode == 0, f"{page.name} console example {index}: `{command}` failed:\n{done.stdout[-3000:]}"
        assert printed == expected, f"{page.name} console example {index}: `{command}` printed:\n" + "\n".join(printed)
