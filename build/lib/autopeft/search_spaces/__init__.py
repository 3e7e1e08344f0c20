"""Declarative search spaces shipped with autopeft (YAML; see autopeft/search/space.py)."""

from pathlib import Path

SPACES_DIR = Path(__file__).resolve().parent
