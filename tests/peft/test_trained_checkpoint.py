"""Saving only the trained part, and refusing to load it where it does not belong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from autopeft.errors import CheckpointError
from autopeft.peft import apply_plan, load_trained, merge_plan, plan_state, save_trained
from autopeft.peft.checkpoint import META_FILE, PLAN_FILE, TRAINED_FILE

PLAN = {"backbone": "toy", "bitfit": True, "sites": {"enc.*": {"method": "lora", "rank": 2}, "dec.cnn.0": {"method": "ssf"}}}


@pytest.fixture()
def saved(envs, tmp_path):
    env = envs("toy")
    model = apply_plan(env.fresh(), PLAN)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        (model(env.x) - env.target).abs().mean().backward()
        optimizer.step()
    model.eval()
    save_trained(model, plan_state(model).plan, tmp_path)
    return model, tmp_path


def test_only_the_trained_part_and_buffers_are_written(saved) -> None:
    model, folder = saved
    tensors = load_file(str(folder / TRAINED_FILE))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.net.named_buffers(prefix="toy")}
    assert set(tensors) == trainable | buffers
    assert "toy.decode.bn.base_layer.running_mean" in tensors  # changed by the train-mode steps
    assert not any(n.startswith("discriminator") for n in tensors)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["backbone"] == "toy" and meta["preset"] == "tiny"
    assert "lora" in (folder / PLAN_FILE).read_text()


def test_round_trip_gives_identical_outputs(saved, envs) -> None:
    model, folder = saved
    env = envs("toy")
    loaded = load_trained(env.base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(env.x), model(env.x), rtol=0, atol=0)
    assert plan_state(env.base) is None  # the pre-trained model is left as it was
    with torch.no_grad():
        torch.testing.assert_close(env.base(env.x), env.base_out, rtol=0, atol=0)


def test_corrupt_file_is_refused(saved, envs) -> None:
    _, folder = saved
    data = bytearray((folder / TRAINED_FILE).read_bytes())
    data[-5] ^= 0xFF
    (folder / TRAINED_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_trained(envs("toy").base, folder)


def test_missing_file_is_refused(saved, envs) -> None:
    _, folder = saved
    (folder / PLAN_FILE).unlink()
    with pytest.raises(CheckpointError, match="plan.yaml missing"):
        load_trained(envs("toy").base, folder)


def test_other_pretrained_weights_are_refused(saved) -> None:
    from _peft_toy import make_toy

    _, folder = saved
    with pytest.raises(CheckpointError, match="other pre-trained weights"):
        load_trained(make_toy(seed=5), folder)


def test_other_backbone_is_refused(saved, envs) -> None:
    _, folder = saved
    with pytest.raises(CheckpointError, match="trained on backbone 'toy', but `base_model` is 'cvtgan'"):
        load_trained(envs("cvtgan").base, folder)


def test_fine_tuned_or_merged_models_cannot_be_used_wrongly(saved, envs, tmp_path) -> None:
    model, folder = saved
    with pytest.raises(CheckpointError, match="already has a plan applied"):
        load_trained(model, folder)
    merge_plan(model)
    with pytest.raises(ValueError, match="was merged"):
        save_trained(model, plan_state(model).plan, tmp_path / "again")
