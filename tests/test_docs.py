"""The documentation is checked like code: its runnable examples run (fences marked ``python run``,
and ``console run`` transcripts, whose output must be what the page shows), every command-line option
is documented in docs/cli.md, and every link between the documents resolves (files and #anchors)."""

from __future__ import annotations

import os
import re
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


def _fences(page: Path, info: str) -> list[str]:
    return [body for tag, body in FENCE.findall(page.read_text()) if tag.strip() == info]


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


EXAMPLES = [(page, i, body) for page in [ROOT / "README.md", *DOCS] for i, body in enumerate(_fences(page, "python run"))]
# examples that scan a real CSAW net (minutes each): run by the slow suite, which CI runs too
SLOW_EXAMPLES = [(page, i, body) for page in [ROOT / "README.md", *DOCS]
                 for i, body in enumerate(_fences(page, "python run slow"))]


def _beside_shared(tmp_path: Path, text: str) -> Path:
    """An empty working folder beside which ``../shared`` is the checkout's (skips the test when
    ``text``, an example, needs ../shared/csaw and it is absent)."""
    shared = ROOT.parent / "shared"
    if "../shared" in text and not (shared / "csaw").is_dir():
        pytest.skip("../shared/csaw is not present")
    (tmp_path / "shared").symlink_to(shared)
    work = tmp_path / "work"
    work.mkdir()
    return work


def _run_example(page: Path, index: int, code: str, tmp_path: Path, threads: int) -> str:
    """Run one Python example as written in an empty folder beside which ``../shared`` is the
    checkout's; it must exit cleanly, and each ``print(...)  # text`` must print a line starting with
    that text up to its last word (the last word, a measured number, may differ in its digits)."""
    work = _beside_shared(tmp_path, code)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    script = f"import torch; torch.set_num_threads({threads})\n" + code
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, f"{page.name} example {index} failed:\n{done.stderr[-3000:]}"
    printed = done.stdout.splitlines()
    for i, line in enumerate(re.findall(r"^print\(.*$", code, re.M)):  # one line printed per print(...)
        comment = re.search(r"\)\s+# (.+)$", line)
        if comment:
            text = comment.group(1).rsplit(" ", 1)[0]
            assert i < len(printed) and printed[i].startswith(text), \
                f"{page.name} example {index}: printed {printed[i] if i < len(printed) else None!r}, the page shows {text!r}"
    return done.stdout


@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=lambda v: v.name if isinstance(v, Path) else str(v)[:0])
def test_python_examples_run(page, index, code, tmp_path):
    """Fences marked ``python run`` run as written, in an empty folder, and must exit cleanly."""
    _run_example(page, index, code, tmp_path, threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("page,index,code", SLOW_EXAMPLES, ids=lambda v: v.name if isinstance(v, Path) else str(v)[:0])
def test_python_examples_that_scan_a_real_net_run(page, index, code, tmp_path):
    """Fences marked ``python run slow`` (a full scan of a CSAW net) run as written, with 2 threads."""
    _run_example(page, index, code, tmp_path, threads=2)


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


TRANSCRIPTS = [(page, i, body) for page in [ROOT / "README.md", *DOCS]
               for i, body in enumerate(_fences(page, "console run"))]


@pytest.mark.parametrize("page,index,body", TRANSCRIPTS, ids=lambda v: v.name if isinstance(v, Path) else str(v)[:0])
def test_console_examples_print_what_the_docs_show(page, index, body, tmp_path):
    """Fences marked ``console run`` are real sessions: each ``$`` command runs (bash, the venv's
    ``netcleanse`` first on PATH) in an empty folder beside which ``../shared`` is the checkout's, and
    prints exactly the lines shown after it (trailing spaces aside). Only cheap commands belong there."""
    work = _beside_shared(tmp_path, body)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLUMNS": "80", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for command, expected in _transcript(body):
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)  # one stream, in order
        printed = [line.rstrip() for line in done.stdout.rstrip("\n").split("\n")] if done.stdout.strip() else []
        assert done.returncode == 0, f"{page.name} console example {index}: `{command}` failed:\n{done.stdout[-3000:]}"
        assert printed == expected, f"{page.name} console example {index}: `{command}` printed:\n" + "\n".join(printed)
