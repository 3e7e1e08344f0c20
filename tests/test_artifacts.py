"""The artifact store: content keys, whole files only, safe when two processes write the same artifact."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest

from _fakes import make_dataset
from autopeft.artifacts import ArtifactStore
from autopeft.checkpoints import file_sha256
from autopeft.data import read_manifest
from autopeft.errors import CheckpointError
from autopeft.pretraining import manifest_digest, pretrained_model


def test_shipped_scans_arrive_byte_for_byte_and_key_the_same(tmp_path):
    manifest = make_dataset(tmp_path / "data", {"1": 2, "2": 2}, shape=(8, 8, 8))
    key = ArtifactStore(str(tmp_path / "store"), cache=tmp_path / "driver").put_data(manifest)
    copy = ArtifactStore(str(tmp_path / "store"), cache=tmp_path / "node").data(key)
    assert copy.is_relative_to(tmp_path / "node")
    here, there = read_manifest(manifest), read_manifest(copy)
    # Gzipped NIfTI files are copied as bytes (pyarrow would otherwise decompress them on the way).
    for a, b in zip(here.sort_values("subject").itertuples(), there.sort_values("subject").itertuples()):
        assert file_sha256(a.short) == file_sha256(b.short) and file_sha256(a.long) == file_sha256(b.long)
    # The key hashes contents, not paths or modification times: the copy keys the same.
    assert manifest_digest(here) == manifest_digest(there) and key.endswith(manifest_digest(here))


def test_the_manifest_digest_changes_with_contents_not_with_times(tmp_path):
    manifest = make_dataset(tmp_path / "data", {"1": 2}, shape=(8, 8, 8))
    frame = read_manifest(manifest)
    before = manifest_digest(frame)
    os.utime(frame.iloc[0]["short"], (1, 1))
    assert manifest_digest(read_manifest(manifest)) == before
    shutil.copyfile(frame.iloc[1]["short"], frame.iloc[0]["short"])  # same name, other scan
    assert manifest_digest(read_manifest(manifest)) != before


def _publish(root: str, cache: str, payload: bytes, rounds: int) -> None:
    store = ArtifactStore(root, cache=cache)
    (store.cache / "pretrained" / "k").mkdir(parents=True, exist_ok=True)
    (store.cache / "pretrained" / "k" / "model.safetensors").write_bytes(payload)
    for _ in range(rounds):
        store.put(store.cache / "pretrained" / "k" / "model.safetensors", "pretrained/k/model.safetensors")


def test_two_processes_publishing_the_same_artifact_both_succeed_and_readers_see_it_whole(tmp_path):
    payload = os.urandom(3 << 20)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_publish, args=(str(tmp_path / "store"), str(tmp_path / f"node{i}"), payload, 3))
               for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    reader = ArtifactStore(str(tmp_path / "store"), cache=tmp_path / "reader")
    assert reader.fetch("pretrained/k/model.safetensors")
    assert (reader.cache / "pretrained" / "k" / "model.safetensors").read_bytes() == payload
    assert not list((tmp_path / "store").rglob("*.tmp-*"))  # no temporary file left behind
    assert not reader.fetch("pretrained/other/model.safetensors")


def test_a_missing_source_model_is_an_error_naming_its_spec_when_pre_training_is_off(tmp_path):
    manifest = make_dataset(tmp_path / "data", {"1": 3}, shape=(20, 18, 16))
    protocol_kwargs = dict(pretrain_train=2, pretrain_val=1, finetune_train=1, finetune_val=1, finetune_test=1, folds=1)
    from autopeft.data import Protocol

    with pytest.raises(CheckpointError, match=r"source model cvtgan-tiny-src1-fold0-e1-.* is missing .* not pre-trained here"):
        pretrained_model("cvtgan", "1", manifest_path=manifest, epochs=1, protocol=Protocol(**protocol_kwargs),
                         cache_dir=tmp_path / "cache", progress=False, train=False)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
