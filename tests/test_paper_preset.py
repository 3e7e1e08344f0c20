"""The paper path without a GPU: every backbone with a ``paper`` preset, at PETITE's sizes on the CPU,
takes one training step with a plan injected and one sliding-window inference, through the code a
search runs (:class:`autopeft.train.Trainer`, :func:`autopeft.evaluation.predict_volume`).

At the preset's crop (64^3) but batch 1, not its batch of 6, for time rather than memory: the paper
UNETR (about 100M parameters) took 40 s of CPU time (110 s wall on 2 cores shared with a load of
8) and 2 GB peak memory for the injection's probe, one step and the inference; 3D CVT-GAN about
half that. ``scripts/gpu-check.sh`` runs the whole path, batch included, on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from autopeft.backbones import build_backbone, registered_backbones
from autopeft.evaluation import predict_volume
from autopeft.peft import Plan, apply_plan, load_plan, named_plans
from autopeft.train import Trainer, TrainSettings

pytestmark = pytest.mark.slow  # builds and trains the paper-sized networks on the CPU

PAPER = "paper"
WITH_PAPER_PRESET = [name for name, presets in registered_backbones().items() if PAPER in presets]


def _plan(backbone: str) -> Plan:
    """PETITE's LoRA row where one ships for the backbone, else BitFit (any network with biases)."""
    if f"{backbone}-lora" in named_plans():
        return load_plan(f"{backbone}-lora")
    return Plan.from_dict({"backbone": backbone, "bitfit": True, "sites": {}})


@pytest.mark.parametrize("backbone", WITH_PAPER_PRESET)
def test_paper_preset_trains_one_step_and_infers_by_sliding_window_on_cpu(backbone):
    torch.manual_seed(0)
    model = build_backbone(backbone, PAPER)
    apply_plan(model, _plan(backbone))
    trained = [(p, p.detach().clone()) for p in model.net.parameters() if p.requires_grad]
    frozen = [(p, p.detach().clone()) for p in model.net.parameters() if not p.requires_grad]
    assert trained and frozen

    crop = model.preset.crop_size
    short = torch.rand(1, 1, *crop)
    loss = Trainer(model, TrainSettings(epochs=1, lr=1e-3)).step({"short": short, "long": (0.8 * short + 0.1)})
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(p, before) for p, before in trained), "the step moved no trained parameter"
    assert all(torch.equal(p, before) for p, before in frozen), "the step moved a frozen parameter"

    # A volume 8 slices deeper than the crop: two windows along the first axis, blended.
    volume = torch.rand(1, crop[0] + 8, *crop[1:])
    model.eval()
    prediction = predict_volume(model, volume, roi_size=crop)
    assert prediction.shape == volume.shape and torch.isfinite(prediction).all()
    # The first 8 slices lie in the first window only: exactly that window's output there.
    with torch.no_grad():
        first_window = model(volume[None, :, : crop[0]])[0]
    torch.testing.assert_close(prediction[:, :8], first_window[:, :8], rtol=1e-4, atol=1e-5)
