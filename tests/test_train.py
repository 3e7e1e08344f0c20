from __future__ import annotations

import math

import pytest
import torch

from autopeft.errors import ConfigError
from autopeft.evaluation import predict_volume
from autopeft.precision import amp_precision
from autopeft.train import EpochCheckpoints, EpochResult, NonFiniteLossError, Trainer, TrainSettings
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


def _unetr_trainer(epochs, precision="fp32"):
    torch.manual_seed(0)
    model = build_backbone("unetr", "tiny")
    model.requires_grad_(True)
    return Trainer(model, TrainSettings(epochs=epochs, lr=1e-3, precision=precision))


def test_checkpoints_let_an_interrupted_fit_go_on_from_its_last_epoch(tmp_path):
    trainer = _unetr_trainer(epochs=2)
    batches = [{key: value[:1] for key, value in _fixed_batch(trainer.model).items()}]  # one crop: cheap epochs
    checkpoints = EpochCheckpoints(tmp_path, {"run": "test"})
    on_disk = []  # an epoch's files are written before on_epoch hears of it
    trainer.fit(batches, checkpoints=checkpoints,
                on_epoch=lambda r: on_disk.append(sorted(p.name for p in tmp_path.iterdir())))
    assert on_disk == [["last.safetensors", "last.state"]] * 2
    assert [row["epoch"] for row in checkpoints.history] == [1, 2] and checkpoints.best is None

    again = _unetr_trainer(epochs=3)  # a new process: fresh weights, optimizer and history
    resumed = EpochCheckpoints(tmp_path, {"run": "test"})
    assert resumed.resume(again)
    assert again.epoch == 2 and [row["epoch"] for row in resumed.history] == [1, 2]
    trained = trainer.model.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in again.model.state_dict().items())
    assert again.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]
    assert [r.epoch for r in again.fit(batches, checkpoints=resumed)] == [3]  # epochs 1 and 2 not trained twice
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert not EpochCheckpoints(tmp_path / "empty", {}).resume(_unetr_trainer(epochs=1))


def test_checkpoints_keep_the_best_epoch_by_psnr_and_remove_their_files(tmp_path):
    trainer = _unetr_trainer(epochs=1)
    checkpoints = EpochCheckpoints(tmp_path, {"run": "test"})
    checkpoints.save(trainer, EpochResult(epoch=1, loss=0.5, metrics={"psnr": 20.0}))
    best_weights = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    with torch.no_grad():  # the weights move, but the next epochs do not beat 20 dB
        next(trainer.model.parameters()).add_(1.0)
    checkpoints.save(trainer, EpochResult(epoch=2, loss=0.4, metrics={"psnr": float("nan")}))
    checkpoints.save(trainer, EpochResult(epoch=3, loss=0.3, metrics={"psnr": 19.0}))
    assert checkpoints.best == {"psnr": 20.0, "epoch": 1}
    fresh = build_backbone("unetr", "tiny")
    assert checkpoints.load_best(fresh) == {"psnr": 20.0, "epoch": 1}
    assert all(torch.equal(value, best_weights[name]) for name, value in fresh.state_dict().items())
    checkpoints.remove()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no epoch was validated"):
        EpochCheckpoints(tmp_path, {}).load_best(fresh)


# Mixed precision --------------------------------------------------------------------------------

def test_mixed_precision_on_a_cpu_trains_in_bfloat16():
    assert (amp_precision(False, "cpu"), amp_precision(True, "cpu")) == ("fp32", "bf16")
    trainer = _unetr_trainer(epochs=1, precision=amp_precision(True, "cpu"))
    computed_in = set()
    for module in trainer.model.net.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(lambda _module, _inputs, output: computed_in.add(output.dtype))
    before = {name: p.detach().clone() for name, p in trainer.model.net.named_parameters()}
    batch = _fixed_batch(trainer.model)
    losses = [trainer.step(batch) for _ in range(2)]
    assert computed_in == {torch.bfloat16}  # every convolution ran under autocast
    assert all(math.isfinite(loss) for loss in losses) and losses[1] < losses[0]
    moved = [name for name, p in trainer.model.net.named_parameters() if not torch.equal(p, before[name])]
    assert len(moved) > len(before) // 2
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # the weights stay float32
    assert "grad_scaler" not in trainer.state_dict()  # bfloat16 scales no loss


def test_float16_is_refused_on_a_cpu_and_unknown_precisions_anywhere():
    model = build_backbone("unetr", "tiny").requires_grad_(True)
    with pytest.raises(ConfigError, match=r"`precision` 'fp16' is for CUDA GPUs, not a CPU: use 'bf16'"):
        Trainer(model, TrainSettings(epochs=1, lr=1e-3, precision="fp16"))
    with pytest.raises(ConfigError, match=r"'fp16' is for CUDA GPUs, not a CPU"):
        predict_volume(torch.nn.Identity(), torch.rand(1, 8, 8, 8), roi_size=(8, 8, 8), precision="fp16")
    with pytest.raises(ConfigError, match=r"`precision` must be one of fp32, bf16, fp16, but got 'fp8'"):
        TrainSettings(epochs=1, lr=1e-3, precision="fp8")


def test_evaluation_under_mixed_precision_is_scored_in_float32():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    volume = torch.rand(1, 12, 12, 12)
    full = predict_volume(net, volume, roi_size=(8, 8, 8))
    mixed = predict_volume(net, volume, roi_size=(8, 8, 8), precision="bf16")
    assert mixed.dtype == torch.float32 and mixed.shape == full.shape
    assert not torch.equal(mixed, full)  # the network ran in bfloat16,
    assert torch.allclose(mixed, full, atol=2e-2)  # close to float32


def test_the_resume_state_keeps_the_loss_scale(tmp_path):
    trainer = _unetr_trainer(epochs=1, precision="bf16")
    # A float16 trainer's scaler (CUDA only): torch's CPU GradScaler keeps the same state, here after
    # backing off from its initial scale as an overflow makes it.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.epoch = 1
    checkpoints = EpochCheckpoints(tmp_path, {"run": "test"})
    checkpoints.save(trainer, EpochResult(epoch=1, loss=0.5))
    again = _unetr_trainer(epochs=2, precision="bf16")
    again.scaler = torch.amp.GradScaler("cpu")
    assert EpochCheckpoints(tmp_path, {"run": "test"}).resume(again)
    assert again.epoch == 1 and again.scaler.get_scale() == 1024.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 mixed precision is for CUDA GPUs")
def test_float16_on_a_gpu_scales_the_losses_of_both_networks_and_resumes_the_scale(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("cvtgan", "tiny").requires_grad_(True)
    trainer = Trainer(model, TrainSettings(epochs=2, lr=1e-3, train_discriminator=True, precision="fp16"), device="cuda")
    before = {name: p.detach().clone() for name, p in model.discriminator.named_parameters()}
    losses = [trainer.step(_fixed_batch(model)) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(p, before[name]) for name, p in model.discriminator.named_parameters())
    checkpoints = EpochCheckpoints(tmp_path, {"run": "test"})
    checkpoints.save(trainer, EpochResult(epoch=1, loss=losses[-1]))
    again = Trainer(build_backbone("cvtgan", "tiny").requires_grad_(True),
                    TrainSettings(epochs=2, lr=1e-3, train_discriminator=True, precision="fp16"), device="cuda")
    assert EpochCheckpoints(tmp_path, {"run": "test"}).resume(again)
    assert again.scaler.state_dict() == trainer.scaler.state_dict()
