"""--weights: a user's own pre-trained model (safetensors, weights-only state dict, MONAI bundle
folder), checked against the backbone, cached by content, and never unpickled beyond tensors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from autopeft.cli import main
from autopeft.errors import CheckpointError
from autopeft.pretraining import imported_model, pretrained_model
from autopeft.backbones import build_backbone


@pytest.fixture(scope="module")
def unetr():
    torch.manual_seed(1)
    return build_backbone("unetr", "tiny")


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_state_dict_a_network_state_dict_safetensors_and_a_bundle_folder_all_load(unetr, tmp_path):
    torch.save(unetr.state_dict(), tmp_path / "whole.pt")
    torch.save({"state_dict": unetr.net.state_dict()}, tmp_path / "nested_net.pth")  # MONAI UNETR's own keys
    save_file({k: v.contiguous() for k, v in unetr.state_dict().items()}, str(tmp_path / "whole.safetensors"))
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save(unetr.net.state_dict(), bundle / "models" / "model.pt")
    for weights in ("whole.pt", "nested_net.pth", "whole.safetensors", "bundle"):
        model, meta = imported_model(tmp_path / weights, "unetr", "tiny", cache_dir=tmp_path / "cache")
        assert _same(model, unetr), weights
        assert meta["best"] is None and meta["imported_from"].startswith(str(tmp_path))


def test_the_imported_model_is_cached_by_content_hash(unetr, tmp_path):
    torch.save(unetr.state_dict(), tmp_path / "a.pt")
    _, first = imported_model(tmp_path / "a.pt", "unetr", "tiny", cache_dir=tmp_path / "cache")
    os.rename(tmp_path / "a.pt", tmp_path / "renamed.pt")  # same bytes, other name: same entry
    _, again = imported_model(tmp_path / "renamed.pt", "unetr", "tiny", cache_dir=tmp_path / "cache")
    entries = sorted(p.name for p in (tmp_path / "cache" / "pretrained").iterdir())
    assert entries == [f"imported-unetr-tiny-{first['sha256'][:16]}"] and again["sha256"] == first["sha256"]
    # pretrained_model(weights=...) is the same entry, with the caller's source and fold.
    model, meta = pretrained_model("unetr", "7", manifest_path=None, weights=tmp_path / "renamed.pt", fold=2,
                                   cache_dir=tmp_path / "cache")
    assert meta["source"] == "7" and meta["fold"] == 2 and _same(model, unetr)
    assert len(list((tmp_path / "cache" / "pretrained").iterdir())) == 1


def test_a_mismatch_lists_missing_and_unexpected_names_and_what_the_file_fits(unetr, tmp_path):
    state = unetr.state_dict()
    state.pop("unetr.out.conv.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        imported_model(tmp_path / "bad.pt", "unetr", "tiny", cache_dir=tmp_path / "cache")
    text = str(info.value)
    assert "missing 1: unetr.out.conv.conv.weight" in text and "unexpected 1: extra.weight" in text
    assert "closest: unetr/tiny" in text
    torch.save(unetr.state_dict(), tmp_path / "unetr.pt")
    with pytest.raises(CheckpointError, match=r"does not fit cvtgan/tiny.*It fits --backbone unetr --preset tiny"):
        imported_model(tmp_path / "unetr.pt", "cvtgan", "tiny", cache_dir=tmp_path / "cache")


class _RunsCode:
    """A pickle payload: unpickling it would call os.system."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_and_never_runs(unetr, tmp_path):
    marker = tmp_path / "code-ran"
    state = dict(unetr.state_dict())
    state["payload"] = _RunsCode(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused.*would call .*system.*nothing in it was run"):
        imported_model(tmp_path / "evil.pt", "unetr", "tiny", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    # Through the command line: one error line, and still nothing ran.
    assert main(["pretrain", "--backbone", "unetr", "--source", "1", "--weights", str(tmp_path / "evil.pt")]) == 2
    assert not marker.exists()


def test_a_pickle_that_is_not_a_state_dict_and_a_missing_bundle_file_are_clear(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        imported_model(tmp_path / "list.pt", "unetr", "tiny", cache_dir=tmp_path / "cache")
    (tmp_path / "empty_bundle").mkdir()
    with pytest.raises(CheckpointError, match="models/model.safetensors"):
        imported_model(tmp_path / "empty_bundle", "unetr", "tiny", cache_dir=tmp_path / "cache")


def test_pretrain_weights_prints_the_cache_entry(unetr, tmp_path, capsys):
    torch.save(unetr.state_dict(), tmp_path / "mine.pt")
    assert main(["pretrain", "--backbone", "unetr", "--source", "1", "--weights", str(tmp_path / "mine.pt")]) == 0
    assert "imported from" in capsys.readouterr().out


@pytest.mark.slow  # fine-tunes
def test_finetune_and_importance_start_from_the_users_model_without_pretraining(unetr, tmp_path, capsys):
    from _fakes import make_dataset
    from autopeft.pretraining import cache_root

    data = make_dataset(tmp_path / "data", {"1": 1, "2": 16}, shape=(20, 18, 16), long_factor=1.5)
    torch.save(unetr.state_dict(), tmp_path / "mine.pt")
    before = set((cache_root() / "pretrained").iterdir()) if (cache_root() / "pretrained").is_dir() else set()
    common = ["--backbone", "unetr", "--source", "1", "--target", "2", "--data", str(data), "--weights", str(tmp_path / "mine.pt"), "--quiet"]
    assert main(["finetune", *common, "--method", "none"]) == 0
    assert "unetr-noft" in capsys.readouterr().out
    assert main(["importance", *common, "--out", str(tmp_path / "imp.json")]) == 0
    added = {p.name for p in set((cache_root() / "pretrained").iterdir()) - before}
    assert added <= {p for p in added if p.startswith("imported-unetr-tiny-")}  # nothing was pre-trained
