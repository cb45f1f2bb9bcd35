#!/usr/bin/env python3
"""Print one of the two commands of README.md's quick start, as written there: `build` (the main job) or `tests`.

`.ci/run` runs the `tests` command through this, so CI runs exactly what the README tells users to run. A quick
start that is not two one-line fenced commands is an error (exit 1), so a README edit cannot silently change what
CI runs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
WHICH = ("build", "tests")


def quick_start_commands(text: str) -> list[str]:
    match = re.search(r"^## Quick start.*?$(.*?)(?=^## )", text, flags=re.S | re.M)
    if not match:
        raise SystemExit("error: README.md has no '## Quick start' section")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", match.group(1), flags=re.S | re.M)
    commands = [[line for line in b.splitlines() if line.strip()] for b in blocks]
    if [len(c) for c in commands] != [1, 1]:
        raise SystemExit(f"error: README.md's quick start must be two one-line commands, found {commands!r:.200}")
    return [c[0] for c in commands]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in WHICH:
        print(f"usage: readme_command.py {{{'|'.join(WHICH)}}}", file=sys.stderr)
        return 2
    print(quick_start_commands(README.read_text())[WHICH.index(argv[0])])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
