#!/usr/bin/env python3
"""Issue 25 item 6: the README became an index and its text moved to docs/. Nothing may be lost on the way: every
line of the old README that carries a number (a figure, a setting, a size) must appear in README.md or docs/*.md.

    python3 .ci/check_docs_moved.py [OLD_REF]      # OLD_REF: the commit whose README.md is the old one

A line passes when it appears whole (whitespace collapsed, relative link targets normalised). A line that was
edited on the way (a cross-reference turned into a link) passes when its closest new line (difflib) carries every
number token of the old one; those are listed. Exit 1 when any line fails."""
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_REF = sys.argv[1] if len(sys.argv) > 1 else "1ef84da529a007dad3e92e1f5d8d2387eae02606"
NUM = re.compile(r"\d+(?:\.\d+)?")


def norm(line: str) -> str:
    line = re.sub(r"\]\((?:\.\./)+", "](", line)          # docs/ links to ../x and README links to x: same target
    line = re.sub(r"\]\(docs/", "](", line)
    return " ".join(line.split())


old = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_REF}:README.md"], capture_output=True, text=True,
                     check=True).stdout.splitlines()
new_files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
new_lines = [norm(l) for f in new_files for l in f.read_text().splitlines()]
new_text = "\n".join(new_lines)
joined = " ".join(new_lines)                              # a line rewrapped across two still counts as whole

checked = whole = 0
edited, lost = [], []
for raw in old:
    if not NUM.search(raw) or not raw.strip():
        continue
    checked += 1
    line = norm(raw)
    if line in joined:
        whole += 1
        continue
    best = max(new_lines, key=lambda n: difflib.SequenceMatcher(None, line, n).ratio())
    nums_old = NUM.findall(line)
    if difflib.SequenceMatcher(None, line, best).ratio() > 0.6 and all(n in best for n in nums_old):
        edited.append((raw.strip(), best))
    else:
        lost.append(raw.strip())

print(f"old README {OLD_REF[:7]}: {len(old)} lines, {checked} carry a number; {whole} found whole in "
      f"{len(new_files)} files, {len(edited)} edited (every number kept), {len(lost)} lost")
for o, n in edited:
    print(f"  edited: {o[:100]}\n      ->  {n[:100]}")
for o in lost:
    print(f"  LOST: {o[:120]}")
sys.exit(1 if lost else 0)
