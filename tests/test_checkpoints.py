from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from autopeft.checkpoints import load_checkpoint, load_state, read_metadata, save_checkpoint, save_state
from autopeft.errors import CheckpointError
from autopeft.backbones import build_backbone


@pytest.mark.parametrize("name", ["unetr", "cvtgan"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = build_backbone(name, "tiny").eval()
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, {"backbone": name, "preset": "tiny", "note": "x"})
    torch.manual_seed(1)
    other = build_backbone(name, "tiny").eval()
    x = torch.rand(1, 1, *model.preset.crop_size)
    assert not torch.equal(model(x), other(x))
    meta = load_checkpoint(other, path, expect={"backbone": name, "preset": "tiny"})
    assert meta["note"] == "x"
    assert torch.equal(model(x), other(x))


def test_mismatched_backbone_names_the_field(tmp_path):
    model = build_backbone("unetr", "tiny")
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"backbone": "unetr", "preset": "tiny"})
    with pytest.raises(CheckpointError, match="backbone='unetr'.*'cvtgan'"):
        load_checkpoint(build_backbone("cvtgan", "tiny"), path, expect={"backbone": "cvtgan"})
    with pytest.raises(CheckpointError, match="does not match the model.*missing"):
        load_checkpoint(build_backbone("cvtgan", "tiny"), path)


def test_wrong_shapes_are_reported(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(nn.Linear(3, 4), path, {})
    with pytest.raises(CheckpointError, match="shape differs for bias, weight"):
        load_checkpoint(nn.Linear(3, 5), path)


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(nn.Linear(3, 4), path, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(nn.Linear(3, 4), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_metadata(tmp_path / "nope.safetensors")


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(nn.Linear(3, 4), evil)
    state = tmp_path / "evil.state"
    torch.save({"x": _Payload(str(marker))}, state)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state(state)
    assert not marker.exists()


def test_state_round_trip(tmp_path):
    opt = torch.optim.AdamW(nn.Linear(3, 4).parameters())
    save_state({"epoch": 3, "optimizer": opt.state_dict()}, tmp_path / "s")
    assert load_state(tmp_path / "s")["epoch"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
