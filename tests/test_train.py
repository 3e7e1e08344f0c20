from __future__ import annotations

import pytest
import torch

from autopeft.train import NonFiniteLossError, Trainer, TrainSettings
from autopeft.backbones import build_backbone


def _fixed_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    short = torch.rand(2, 1, *model.preset.crop_size, generator=g)
    long = (short * 0.8 + 0.1).clamp(0, 1)
    return {"short": short, "long": long}


@pytest.mark.slow  # trains both backbones
@pytest.mark.parametrize("name", ["unetr", "cvtgan"])
def test_training_lowers_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_backbone(name, "tiny")
    model.requires_grad_(True)
    trainer = Trainer(model, TrainSettings(epochs=1, lr=1e-3, train_discriminator=model.discriminator is not None))
    batch = _fixed_batch(model)
    losses = [trainer.step(batch) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_frozen_parameters_do_not_move():
    torch.manual_seed(0)
    model = build_backbone("unetr", "tiny")
    model.requires_grad_(False)
    first = next(model.net.parameters())
    first.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in model.net.named_parameters() if not p.requires_grad}
    Trainer(model, TrainSettings(epochs=1, lr=1e-2)).step(_fixed_batch(model))
    for name, param in model.net.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_discriminator_frozen_in_fine_tuning():
    model = build_backbone("cvtgan", "tiny")
    before = {n: p.detach().clone() for n, p in model.discriminator.named_parameters()}
    trainer = Trainer(model, TrainSettings(epochs=1, lr=1e-2))
    trainer.step(_fixed_batch(model))
    assert all(not p.requires_grad for p in model.discriminator.parameters())
    for name, param in model.discriminator.named_parameters():
        assert torch.equal(param, before[name]), name


def _norm_statistics(module):
    return {n: b.detach().clone() for n, b in module.named_buffers() if "running" in n}


def test_peft_keeps_frozen_batchnorm_statistics_and_full_ft_updates_them():
    from autopeft.peft import apply_plan

    torch.manual_seed(0)
    model = build_backbone("cvtgan", "tiny")
    apply_plan(model, {"backbone": "cvtgan", "sites": {"decoder.*.block*": {"method": "lora", "rank": 2}}, "bitfit": True})
    generator, discriminator = _norm_statistics(model.net), _norm_statistics(model.discriminator)
    assert generator and discriminator
    Trainer(model, TrainSettings(epochs=1, lr=1e-3)).step(_fixed_batch(model))
    # LoRA + BitFit train no BatchNorm scale: every running statistic, the frozen D's included, is as pre-trained.
    for name, value in _norm_statistics(model.net).items():
        assert torch.equal(value, generator[name]), name
    for name, value in _norm_statistics(model.discriminator).items():
        assert torch.equal(value, discriminator[name]), name

    full = build_backbone("cvtgan", "tiny")
    full.net.requires_grad_(True)
    before = _norm_statistics(full.net)
    Trainer(full, TrainSettings(epochs=1, lr=1e-3)).step(_fixed_batch(full))
    assert any(not torch.equal(value, before[name]) for name, value in _norm_statistics(full.net).items())


def test_nothing_to_train_is_an_error():
    model = build_backbone("unetr", "tiny").requires_grad_(False)
    with pytest.raises(ValueError, match="Nothing to train"):
        Trainer(model, TrainSettings(epochs=1, lr=1e-3))


def test_non_finite_loss_stops_training():
    model = build_backbone("unetr", "tiny")
    batch = _fixed_batch(model)
    batch["long"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="nan"):
        Trainer(model, TrainSettings(epochs=1, lr=1e-3)).step(batch)


@pytest.mark.parametrize("bad", [{"epochs": -1, "lr": 1e-3}, {"epochs": 1, "lr": 0.0}])
def test_bad_settings(bad):
    with pytest.raises(ValueError, match="must be"):
        TrainSettings(**bad)
