from __future__ import annotations


import pytest
import torch

from _fakes import make_dataset
from autopeft.data import Protocol, read_manifest
from autopeft.errors import ConfigError
from autopeft.pretraining import cache_root, manifest_digest, pretrained_model


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    return make_dataset(root, {"1": 3, "2": 3}, shape=(20, 18, 16), long_factor=1.5)


# Two training subjects and one validation subject keep these tests to seconds.
SMALL = Protocol(pretrain_train=2, pretrain_val=1, finetune_train=1, finetune_test=2)


@pytest.mark.slow  # trains
def test_trains_once_then_comes_from_the_cache(manifest, tmp_path):
    model, meta = pretrained_model("unetr", "1", manifest_path=manifest, epochs=2, cache_dir=tmp_path, progress=False, protocol=SMALL)
    assert meta["epochs"] == 2 and meta["source"] == "1" and meta["best"]["epoch"] in (1, 2)
    assert set(meta["best"]) >= {"psnr", "ssim", "nrmse"}
    entry = next((tmp_path / "pretrained").iterdir())
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")) == ["history.json", "model.safetensors"]
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir() if not p.name.startswith(".")}  # not the lock
    again, meta2 = pretrained_model("unetr", "1", manifest_path=manifest, epochs=2, cache_dir=tmp_path, progress=False, protocol=SMALL)
    # From the cache: nothing was trained or written again.
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir() if not p.name.startswith(".")} == stamps
    assert meta2 == meta
    x = torch.rand(1, 1, *model.preset.crop_size)
    assert torch.equal(model(x), again(x))


@pytest.mark.slow  # trains
def test_interrupted_pretraining_resumes_from_last_epoch(manifest, tmp_path):
    seen = []

    def interrupt_after_first(result):
        seen.append(result.epoch)
        if result.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrained_model("unetr", "2", manifest_path=manifest, epochs=3, cache_dir=tmp_path, progress=False, protocol=SMALL,
                         on_epoch=interrupt_after_first)
    entry = next((tmp_path / "pretrained").iterdir())
    assert (entry / "last.safetensors").exists() and not (entry / "model.safetensors").exists()
    _, meta = pretrained_model("unetr", "2", manifest_path=manifest, epochs=3, cache_dir=tmp_path, progress=False, protocol=SMALL,
                               on_epoch=lambda r: seen.append(r.epoch))
    assert seen == [1, 2, 3]  # epoch 1 was not trained twice
    assert not (entry / "last.safetensors").exists()
    history = (entry / "history.json").read_text()
    assert history.count('"epoch"') == 3


def test_key_changes_with_the_data(tmp_path):
    """The source model's cache key follows the scans' contents: other data, or one scan rewritten
    in place (same path), keys another model; the same scans copied elsewhere do not."""
    import shutil

    import nibabel as nib
    import numpy as np

    from autopeft.pretraining import source_spec

    def key(path) -> str:
        return source_spec("unetr", "1", manifest=read_manifest(path), epochs=1).key()

    first = make_dataset(tmp_path / "a", {"1": 3}, shape=(20, 18, 16), seed=1)
    assert key(first) != key(make_dataset(tmp_path / "b", {"1": 3}, shape=(20, 18, 16), seed=5))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert key(tmp_path / "copy" / first.name) == key(first)
    scan = read_manifest(first).iloc[0]["short"]
    before = key(first)
    image = nib.load(scan)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 1.01, image.affine, image.header), scan)
    assert key(first) != before


def test_unknown_backbone_and_preset(manifest):
    with pytest.raises(ConfigError, match="registered"):
        pretrained_model("resnet", "1", manifest_path=manifest)
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        pretrained_model("unetr", "1", manifest_path=manifest, preset="huge")


def test_default_cache_is_isolated_in_tests():
    assert "autopeft-cache" in str(cache_root())


def test_an_empty_cache_variable_means_the_default_everywhere(monkeypatch):
    from pathlib import Path

    from autopeft._io import cache_root as shared

    monkeypatch.setenv("AUTOPEFT_CACHE", "")
    assert cache_root() == shared() == Path.home() / ".cache" / "autopeft"


@pytest.mark.parametrize("backbone", ["unetr", "cvtgan"])
def test_the_presets_schedules_keep_the_cache_keys_of_before(manifest, backbone):
    # Keys written before the schedules moved onto the presets must still be found.
    from autopeft.data.loading import PIPELINE_VERSION
    from autopeft.pretraining import source_spec

    frame = read_manifest(manifest)
    digest = manifest_digest(frame)
    tiny = source_spec(backbone, "1", manifest=frame, preset="tiny").key()
    paper = source_spec(backbone, "1", manifest=frame, preset="paper").key()
    assert tiny == f"{backbone}-tiny-src1-fold0-e120-c4-lr0.002-seed0-p8+4-v{PIPELINE_VERSION}-{digest}"
    assert paper == f"{backbone}-paper-src1-fold0-e1000-c1-lr0.0001-seed0-p8+4-v{PIPELINE_VERSION}-{digest}"


def test_mixed_precision_keys_a_model_of_its_own_and_older_metadata_reads_as_full_precision(manifest):
    from dataclasses import asdict

    from autopeft.pretraining import SourceSpec, source_spec

    frame = read_manifest(manifest)
    full = source_spec("unetr", "1", manifest=frame)
    mixed = source_spec("unetr", "1", manifest=frame, amp=True)
    assert mixed.key() == full.key() + "-amp" and "amp" not in full.key()
    older = {key: value for key, value in asdict(full).items() if key != "amp"}  # a model cached before the setting
    assert SourceSpec.from_metadata({**older, "best": None}) == full


@pytest.mark.slow  # trains
def test_mixed_precision_pretraining_trains_in_bfloat16_on_a_cpu(manifest, tmp_path):
    model, meta = pretrained_model("unetr", "1", manifest_path=manifest, epochs=1, protocol=SMALL, cache_dir=tmp_path,
                                   progress=False, amp=True)
    assert meta["amp"] is True and meta["precision"] == "bf16" and meta["best"]["epoch"] == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == [
        f"unetr-tiny-src1-fold0-e1-c4-lr0.002-seed0-p2+1-v{meta['pipeline']}-{meta['data']}-amp"]
