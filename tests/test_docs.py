"""README.md is an index (issue 25): short, its quick start two commands (the ones .ci/run performs), a row for
every CLI command, and every relative link in it and in docs/*.md leads to a file (and heading) that exists."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHECKOUT
from sls_deploy.cli import cli

README = CHECKOUT / "README.md"
DOCS = sorted((CHECKOUT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The Markdown outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped (inline code's text kept:
    ``## Planners (`--method`)`` is #planners---method), spaces -> -."""
    found = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def test_readme_is_an_index_of_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_the_docs_the_readme_indexes_exist():
    names = {p.name for p in DOCS}
    assert {"methods.md", "precision.md", "bundle.md", "video.md", "adaptive.md", "tensorrt.md", "results.md",
            "architecture.md"} <= names


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(CHECKOUT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_file():
            broken.append(f"{target}: no file {dest}")
        elif not dest.is_relative_to(CHECKOUT.resolve()):
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, broken


def test_the_quick_start_is_exactly_the_two_commands_ci_runs():
    quick = _section(README.read_text(), "Quick start")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", quick, flags=re.S | re.M)
    commands = [[line for line in b.splitlines() if line.strip()] for b in blocks]
    assert [len(c) for c in commands] == [1, 1], commands
    build, tests = commands[0][0], commands[1][0]
    assert build.endswith("sls-deploy build --model edsr --budget 0.4")
    assert tests.endswith("bash .ci/test")
    # .ci/run reads the test command from the README and runs that string, nothing else
    reader = CHECKOUT / ".ci" / "readme_command.py"
    printed = [subprocess.run([sys.executable, str(reader), which], capture_output=True, text=True, check=True).stdout
               for which in ("build", "tests")]
    assert printed == [build + "\n", tests + "\n"]
    ci = (CHECKOUT / ".ci" / "run").read_text()
    assert '"$(python3 .ci/readme_command.py tests)"' in ci and 'bash -euo pipefail -c "$cmd"' in ci
    assert not re.search(r"^\s*pip install", ci, flags=re.M)  # no install step of its own


def test_the_readme_command_reader_refuses_a_quick_start_it_cannot_read(tmp_path):
    ci = tmp_path / ".ci"
    ci.mkdir()
    shutil.copy2(CHECKOUT / ".ci" / "readme_command.py", ci)
    (tmp_path / "README.md").write_text("# x\n\n## Quick start\n\n```bash\none\ntwo\n```\n\n## Next\n")
    r = subprocess.run([sys.executable, str(ci / "readme_command.py"), "tests"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: README.md's quick start must be two one-line commands")
    r = subprocess.run([sys.executable, str(ci / "readme_command.py"), "lint"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_the_command_table_has_one_row_per_cli_command():
    table = _section(README.read_text(), "Commands")
    rows = re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M)
    assert sorted(rows) == sorted(cli.commands), (rows, list(cli.commands))
