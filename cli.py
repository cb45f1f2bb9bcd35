#!/usr/bin/env python3
"""Run the sls-deploy CLI from a source checkout: `python cli.py build --model edsr --budget 0.4`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sls_deploy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
