"""Shared set-up of the runner's tests."""

from __future__ import annotations

import sys
from pathlib import Path

# Shared helpers of the runner's tests (_two_nodes.py) sit beside them.
sys.path.insert(0, str(Path(__file__).parent))
