"""Fixtures shared by the PEFT tests: pre-trained-looking models built once per session."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

# Helpers (the toy backbone) live in tests/peft/_peft_toy.py, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))
from _peft_toy import l1_loss  # noqa: E402

from autopeft.importance import compute_importance


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    # Every PEFT test module runs many small forward passes (tests/conftest.py's one_torch_thread).
    yield


@dataclass
class Env:
    """One backbone ready for the method matrix: the untouched model and a batch."""

    base: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    base_out: torch.Tensor
    scores: dict[str, torch.Tensor]

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.base)


def _build(name: str) -> nn.Module:
    if name == "toy":
        from _peft_toy import make_toy

        return make_toy()
    from autopeft.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone(name, "tiny").eval()


@pytest.fixture(scope="session")
def envs():
    """``envs(name)`` -> :class:`Env` for ``toy``, ``unetr`` or ``cvtgan`` (built on first use)."""
    cache: dict[str, Env] = {}

    def get(name: str) -> Env:
        if name not in cache:
            base = _build(name)
            side = base.preset.crop_size
            generator = torch.Generator().manual_seed(1)
            # Batch 2 for the toy (BatchNorm in train mode), 1 for the real backbones (speed).
            x = torch.rand(2 if name == "toy" else 1, 1, *side, generator=generator)
            target = (x * 1.2 + 0.05 * torch.rand(x.shape, generator=generator)).clamp(0, 1)
            with torch.no_grad():
                base_out = base(x)
            scores = compute_importance(base, [(x, target)], l1_loss)
            cache[name] = Env(base, x, target, base_out, scores)
        return cache[name]

    return get
