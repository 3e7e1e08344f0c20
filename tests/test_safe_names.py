"""Names that come from data never become paths as they are (#24): autopeft._io.path_component,
path_inside and the writers that use them."""

from __future__ import annotations

import doctest
import os
import re

import pytest

from autopeft import _io
from autopeft._io import MAX_COMPONENT, adopt_legacy, atomic_write_text, path_component, path_inside
from autopeft.errors import DataError

# Scanner and subject names a data set may hold: separators, traversal, spaces, options,
# non-ASCII, overlong.
HOSTILE = [
    "Philips Gemini / Allegro",
    "Siemens Biograph HiRez / TruePoint",
    "Evil/" + "../" * 8 + "tmp",
    "..",
    ".",
    "../x",
    "a\\b",
    "C:\\scans",
    "with space",
    "-rf",
    ".hidden",
    "Müller Ωmega 日本",
    "x" * 300,
    "",
    "a\x00b",
    "tab\tnew\nline",
    "Siemens ECAT HR+",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_becomes_one_plain_bounded_component(name):
    part = path_component(name)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", part), part
    assert part not in (".", "..") and "/" not in part and "\\" not in part
    assert 0 < len(part) <= MAX_COMPONENT
    assert part != name  # each of these needed changing
    assert part == path_component(name)  # the same name, the same path, in every process


@pytest.mark.parametrize("name", ["1", "HRRT", "Biograph_mCT-2", "sub-001", "a.b", "No-FT", "trial12", "x" * MAX_COMPONENT])
def test_a_safe_name_is_kept_as_it_is_so_caches_keep_their_keys(name):
    assert path_component(name) == name
    assert path_component(path_component(name)) == name


def test_names_never_share_a_component():
    names = HOSTILE + ["Philips Gemini  Allegro", "Philips-Gemini-Allegro", "Philips Gemini/Allegro", "a/b", "a b", "a-b",
                       "x" * 301, "x" * 299, "1", "01"]
    # A kept name that looks like a hashed one is hashed too: a crafted name cannot take another's place.
    names.append(path_component("a b"))
    parts = [path_component(n) for n in names]
    assert len(set(parts)) == len(set(names))


def test_the_readable_part_survives():
    assert path_component("Philips Gemini / Allegro").startswith("Philips-Gemini-Allegro--")
    assert path_component("Müller").startswith("Muller--")
    assert path_component("sub 01").startswith("sub-01--")


def test_docstring_examples_hold():
    failures, attempted = doctest.testmod(_io)
    assert failures == 0 and attempted >= 3


def test_path_inside_refuses_what_leaves_the_root(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    assert path_inside(root, root / "pretrained" / "a" / "model.safetensors") == root / "pretrained" / "a" / "model.safetensors"
    for escape in (root / ".." / "elsewhere", root / "a" / ".." / ".." / "x", tmp_path / "other", "/etc/passwd"):
        with pytest.raises(DataError, match=r"`path` must lie inside .*, but got"):
            path_inside(root, escape)
    # A symbolic link into the root is the user's own choice (a cache moved to a bigger disk).
    (tmp_path / "big").mkdir()
    os.symlink(tmp_path / "big", root / "pretrained")
    assert path_inside(root, root / "pretrained" / "k" / "model.safetensors")
    with pytest.raises(DataError):
        path_inside(root, root / "pretrained" / ".." / ".." / "x")


def test_atomic_writers_check_their_root_before_writing(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    atomic_write_text(root / "ok.txt", "x", inside=root)
    with pytest.raises(DataError, match="nothing was written"):
        atomic_write_text(root / ".." / "escaped.txt", "x", inside=root)
    assert not (tmp_path / "escaped.txt").exists()


def test_a_legacy_cache_entry_is_moved_once_and_said_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_io, "_ADOPTED", set())
    root = tmp_path / "pretrained"
    old = root / "unetr-tiny-srcPhilips Gemini " / " Allegro-fold0"  # what a '/' in a name made
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"w")
    new = root / f"unetr-tiny-src{path_component('Philips Gemini / Allegro')}-fold0"
    assert adopt_legacy(root, old, new, what="source models")
    assert (new / "model.safetensors").read_bytes() == b"w" and not (root / "unetr-tiny-srcPhilips Gemini ").exists()
    assert "source models in the cache are re-keyed" in capsys.readouterr().err
    assert not adopt_legacy(root, old, new, what="source models")  # nothing left to move
    other = root / "old2"
    other.mkdir()
    assert adopt_legacy(root, other, root / "new2", what="source models")
    assert capsys.readouterr().err == ""  # said once
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert not adopt_legacy(root, root / ".." / "elsewhere", root / "new3", what="source models")
    assert outside.is_dir() and not (root / "new3").exists()


# Through the modules, without Ray or training -----------------------------------------------------
def _files(root):
    return {p for p in root.rglob("*") if p.is_file()}


def _bids(root, scanners, *, subjects=1, shape=(8, 8, 8)):
    """A BIDS-PET dataset: ``subjects`` scans per scanner name (the sidecars' ManufacturersModelName),
    six 5-minute frames each."""
    import numpy as np

    from autopeft.data.bids import write_dataset_files, write_pet_scan

    rng = np.random.default_rng(0)
    labels = []
    for s, scanner in enumerate(scanners):
        for i in range(subjects):
            label = f"s{s}n{i:02d}"
            labels.append(label)
            base = rng.random(shape).astype(np.float32) + 0.5
            frames = np.stack([base * (1 + 0.1 * rng.standard_normal(shape)) for _ in range(6)], axis=-1).astype(np.float32)
            sidecar = {"ManufacturersModelName": scanner, "Manufacturer": "Test", "FrameTimesStart": [300 * k for k in range(6)],
                       "FrameDuration": [300] * 6}
            write_pet_scan(root, f"sub-{label}/pet/sub-{label}_trc-FDG_pet.nii.gz", frames, np.diag([2.0, 2.0, 2.0, 1.0]),
                           sidecar, 300.0)
    write_dataset_files(root, name="hostile", participants=labels, readme="scanner names from outside")
    return root


SCANNERS = ["Philips Gemini / Allegro", "Siemens Biograph HiRez / TruePoint", "Evil/" + "../" * 8 + "escaped", "..",
            "a\\b", "with space", "-rf", "Müller Ωmega", "x" * 300, "Philips Gemini  Allegro"]


def test_data_bids_keeps_every_scan_inside_out_one_folder_per_scanner(tmp_path, capsys):
    from autopeft.cli import main
    from autopeft.data import read_manifest

    # Deep enough that eight '..' from the derived folder stay inside tmp_path, where we look.
    sandbox = tmp_path.joinpath(*[f"l{i}" for i in range(10)])
    bids = _bids(sandbox / "bids", SCANNERS)
    given = {p: p.read_bytes() for p in _files(bids)}
    out = sandbox / "derived"
    assert main(["data", "--bids", str(bids), "--short", "0-5", "--long", "0-30", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert {p for p in _files(tmp_path)} == set(given) | _files(out)  # nothing outside --out was written
    assert all(p.read_bytes() == given[p] for p in given)  # inputs untouched
    frame = read_manifest(out)
    assert set(frame["scanner"]) == set(SCANNERS)  # the names themselves, readable
    folders = {os.path.dirname(p) for p in frame["short"]}
    assert len(folders) == len(SCANNERS)  # two names never share a folder ("a / b" and "a  b" did)
    assert all(os.path.dirname(folder) == str(out) for folder in folders)
    import json

    assert set(json.loads((out / "scanners.json").read_text(encoding="utf-8"))) == set(SCANNERS)
    assert "Philips Gemini / Allegro" in printed and "Müller Ωmega" in printed


def test_source_model_keys_keep_plain_names_and_make_others_one_component(tmp_path):
    from _fakes import make_dataset
    from autopeft.data import read_manifest
    from autopeft.pretraining import model_file, source_spec

    frame = read_manifest(make_dataset(tmp_path / "d", {"1": 1}))
    plain = source_spec("unetr", "Biograph_mCT", manifest=frame)
    assert plain.key() == plain.legacy_key() and "srcBiograph_mCT-fold0" in plain.key()
    for name in SCANNERS:
        spec = source_spec("unetr", name, manifest=frame)
        assert spec.source == name  # the readable name stays in the spec (and the checkpoint's metadata)
        relative = model_file(spec)
        assert relative.count("/") == 2 and ".." not in relative.split("/")
        assert f"src{path_component(name)}-fold0" in spec.key()


def test_a_source_model_under_its_old_raw_name_key_is_moved_not_trained_again(tmp_path, capsys, monkeypatch):
    from _fakes import make_dataset
    from autopeft.checkpoints import save_checkpoint
    from autopeft.data import read_manifest
    from autopeft.pretraining import is_pretrained, pretrained_model, source_spec
    from autopeft.backbones import build_backbone

    monkeypatch.setattr(_io, "_ADOPTED", set())
    manifest = make_dataset(tmp_path / "d", {"1": 1})
    cache = tmp_path / "cache"
    keys = set()
    # A space made a folder with a space; a '/' made two nested folders.
    for name in ("Siemens Biograph mCT class", "Philips Gemini / Allegro"):
        spec = source_spec("unetr", name, manifest=read_manifest(manifest), epochs=1)
        legacy = cache / "pretrained" / spec.legacy_key() / "model.safetensors"
        legacy.parent.mkdir(parents=True)
        save_checkpoint(build_backbone("unetr", "tiny"), legacy, {"backbone": "unetr", "preset": "tiny", "source": name})
        assert is_pretrained(spec, cache)
        keys.add(spec.key())
        assert {p.name for p in (cache / "pretrained").iterdir()} == keys  # moved; emptied folders removed
        # train=False: a model that had to be trained again would be an error.
        _, meta = pretrained_model("unetr", name, manifest_path=manifest, epochs=1, cache_dir=cache, train=False, progress=False)
        assert meta["source"] == name
    assert capsys.readouterr().err.count("re-keyed") == 1  # said once


def test_importance_maps_are_keyed_by_path_components():
    from dataclasses import asdict

    from autopeft.finetuning import FinetuneJob, importance_file
    from autopeft.pretraining import SourceSpec

    spec = SourceSpec(backbone="unetr", preset="tiny", source="../../src", fold=0, epochs=1, lr=1e-3, seed=0, data="d" * 16,
                      protocol="8+4", crops=4)
    train = [{"subject": "../s"}]
    for target in SCANNERS:
        job = FinetuneJob(backbone="unetr", preset="tiny", manifest_path="m.csv", source=spec.source, target=target)
        relative = importance_file(job, asdict(spec), train=train)
        assert relative.startswith("importance/") and relative.count("/") == 1
        assert f"-tgt{path_component(target)}-" in relative
    plain = FinetuneJob(backbone="unetr", preset="tiny", manifest_path="m.csv", source="1", target="2")
    assert "-tgt2-" in importance_file(plain, asdict(spec), train=train)


def test_predict_names_outputs_by_path_components_inside_out(tmp_path):
    import csv

    from _fakes import make_dataset
    from autopeft.inference import predict_scans, scan_inputs
    from autopeft.model_loading import LoadedModel
    from autopeft.backbones import build_backbone

    manifest = make_dataset(tmp_path / "d", {"1": 1}, shape=(8, 8, 8))
    row = next(csv.DictReader(open(manifest)))
    subjects = ["../../../escaped", "/abs", "-rf", "a\\b", "Müller", "y" * 300]
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "scanner", "short", "long"])
        for subject in subjects:
            writer.writerow([subject, "1", row["short"], row["long"]])
    model = build_backbone("unetr", "tiny").eval()
    loaded = LoadedModel(model, tuple(model.preset.crop_size), "unetr", "tiny")
    out = tmp_path / "pred"
    results = predict_scans(loaded, scan_inputs(manifest), out, progress=False)
    assert [r["name"] for r in results] == [f"{s}_pred" for s in subjects]
    assert {os.path.dirname(r["output"]) for r in results} == {str(out)}
    assert len({r["output"] for r in results}) == len(subjects)
    assert _files(tmp_path) == _files(tmp_path / "d") | _files(out)


def test_confirmation_records_and_artifact_keys_stay_inside(tmp_path):
    from autopeft.artifacts import ArtifactStore
    from autopeft.runner.confirm import _job_path

    assert _job_path(tmp_path, "#3", 0, 1) == tmp_path / "confirmation" / "trial3-fold0-seed1.json"  # as before
    assert _job_path(tmp_path, "No-FT", 0, 1).name == "No-FT-fold0-seed1.json"
    hostile = _job_path(tmp_path, "../../../etc/passwd", 0, 1)
    assert hostile.parent == tmp_path / "confirmation"
    store = ArtifactStore(str(tmp_path / "store"), cache=tmp_path / "cache")
    for key in ("../x", "/etc/passwd", "pretrained/../../x", "a//b"):
        with pytest.raises(DataError, match="artifact `key` must be a relative path"):
            store.has(key)
    with pytest.raises(DataError, match="must lie inside"):
        store.fetch("pretrained/..\\..\\x/../../../y")


def test_trained_parts_of_runs_made_before_are_still_found(tmp_path):
    from autopeft.runs import find_pair, pair_folder

    weights = tmp_path / "run" / "best_weights"
    assert pair_folder("1", "2", 0) == "1-2-fold0"  # plain names: the folders of before
    old = weights / "Siemens Biograph mCT class-HRRT-fold0"
    old.mkdir(parents=True)
    assert find_pair(weights, "Siemens Biograph mCT class", "HRRT", 0) == old
    new = weights / pair_folder("Siemens Biograph mCT class", "HRRT", 0)
    new.mkdir()
    assert find_pair(weights, "Siemens Biograph mCT class", "HRRT", 0) == new
    (tmp_path / "run" / "outside-x-fold0").mkdir()
    assert find_pair(weights, "../outside", "x", 0) == weights / pair_folder("../outside", "x", 0)  # never outside


# The whole way through the command line, with a real search (Ray) --------------------------------
SOURCE = "Evil/" + "../" * 8 + "escaped"  # what wrote a checkpoint outside the cache (#24)
TARGET = "Philips Gemini / Allegro"
SUBJECTS = ["../../../escaped", "/abs/sub", "-rf", "a\\b", "Müller Ωmega", "with space", "y" * 300, ".."]


@pytest.mark.slow  # starts Ray, pre-trains and fine-tunes tiny models
def test_hostile_names_through_every_command_write_only_inside_cache_run_and_out(tmp_path, monkeypatch, capsys):
    import csv
    import json

    import ray

    from autopeft.cli import main

    sandbox = tmp_path.joinpath(*[f"l{i}" for i in range(10)])  # eight '..' from any folder here stay in tmp_path
    cache, run, pred, bundle, saved, mine, work = (sandbox / n for n in ("cache", "run", "pred", "bundle", "saved", "mine", "cwd"))
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a default output in the working directory would show here
    monkeypatch.setenv("AUTOPEFT_CACHE", str(cache))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # tests only: no token file for a throwaway local cluster
    if ray.is_initialized():
        ray.shutdown()  # its workers would keep another cache

    # 16 subjects per scanner: the default protocol's pre-training and fine-tuning splits.
    bids = _bids(sandbox / "bids", [SOURCE, TARGET], subjects=16, shape=(16, 16, 16))
    given = {p: p.read_bytes() for p in _files(bids)}
    derived = sandbox / "derived"
    assert main(["data", "--bids", str(bids), "--short", "0-5", "--long", "0-30", "--out", str(derived), "--quiet"]) == 0
    # A manifest of the user's, with subjects named as badly as the scanners.
    data = sandbox / "edited"
    data.mkdir()
    with open(derived / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "scanner", "short", "long"])
        for i, row in enumerate(rows):
            writer.writerow([f"{SUBJECTS[i % len(SUBJECTS)]} {i}", row["scanner"], derived / row["short"], derived / row["long"]])
    (data / "scanners.json").write_bytes((derived / "scanners.json").read_bytes())
    assert main(["data", "--manifest", str(data / "manifest.csv")]) == 0
    assert main(["pretrain", "--backbone", "unetr", "--source", SOURCE, "--data", str(data), "--epochs", "1", "--out", str(mine),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"pre-trained on scanner {SOURCE}" in printed and TARGET in printed
    # The search and the fine-tuning start from it (--weights): one pair, nothing pre-trained again.
    weights = ["--weights", str(mine / "model.safetensors")]

    plan = sandbox / "plan.yaml"
    plan.write_text("backbone: unetr\nname: ../../escaped plan\nsites:\n  decoder.*:\n    method: ssf\n", encoding="utf-8")
    assert main(["finetune", "--backbone", "unetr", "--source", SOURCE, "--target", TARGET, "--data", str(data),
                 *weights, "--epochs", "1", "--plan", str(plan), "--save", str(saved), "--quiet"]) == 0
    assert "../../escaped plan" in capsys.readouterr().out
    [kept] = saved.iterdir()
    assert json.loads((kept / "meta.json").read_text(encoding="utf-8"))["plan"] == "../../escaped plan"

    try:
        assert main(["search", "--backbone", "unetr", "--budget", "1%", "--data", str(data), "--trials", "2", "--epochs", "1",
                     *weights, "--source", SOURCE, "--no-references", "--no-asha", "--device", "cpu", "--out", str(run),
                     "--quiet", "--confirm", "1", "--confirm-folds", "1", "--confirm-seeds", "1", "--priors", "off"]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert SOURCE in printed and TARGET in printed  # the settings and the tables name the scanners readably
    report = (run / "report.html").read_text(encoding="utf-8")
    assert "Philips Gemini / Allegro" in report or "Philips Gemini \\/ Allegro" in report
    trained = [p for p in (run / "best_weights").iterdir()]
    assert trained and all(p.parent == run / "best_weights" for p in trained)
    assert [(m["source"], m["target"]) for m in (json.loads((p / "meta.json").read_text()) for p in trained)] == [(SOURCE, TARGET)]
    assert json.loads((run / "examples" / "slices.json").read_text())["target"] in (SOURCE, TARGET)

    assert main(["predict", "--model", str(run), "--target", TARGET, "--input", str(data / "manifest.csv"),
                 "--out", str(pred), "--quiet"]) == 0
    assert TARGET in capsys.readouterr().out
    results = json.loads((pred / "predictions.json").read_text(encoding="utf-8"))
    assert len(results) == 16 and {os.path.dirname(r["output"]) for r in results} == {str(pred)}
    assert {r["name"] for r in results} == {f"{row[0]}_pred" for row in _manifest_rows(data) if row[1] == TARGET}
    assert main(["export", str(run), "--target", TARGET, "--out", str(bundle)]) == 0
    assert TARGET in capsys.readouterr().out
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["autopeft"]["target"] == TARGET

    allowed = (cache, run, pred, bundle, saved, mine, derived, data, bids)
    strays = [p for p in _files(tmp_path) if not any(root in p.parents for root in allowed) and p != plan]
    assert not strays, strays[:5]
    assert not any(work.iterdir())
    assert set(_files(bids)) == set(given) and all(p.read_bytes() == given[p] for p in given)
    for root in (cache, run):  # every name autopeft made there is a plain path component (Ray names its own)
        names = {part for p in root.rglob("*") if "ray" not in p.relative_to(root).parts[:1]
                 for part in p.relative_to(root).parts}
        assert all(re.fullmatch(r"[A-Za-z0-9_.+=-][A-Za-z0-9._+=-]*", name) for name in names if not name.startswith(".")), \
            sorted(n for n in names if not re.fullmatch(r"[A-Za-z0-9_.+=-]+", n))[:5]


def _manifest_rows(folder):
    import csv

    with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
        return [row for row in csv.reader(handle)][1:]


@pytest.mark.parametrize("folder", ["run%2Fsub", "run #1", "what?now", "50% off"])
def test_a_run_folder_named_like_url_syntax_keeps_its_study_inside(tmp_path, folder):
    import optuna

    from autopeft.runs import study_path, study_storage_url

    run_dir = tmp_path / folder
    run_dir.mkdir()
    optuna.create_study(storage=study_storage_url(run_dir), study_name="s")
    assert study_path(run_dir).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]  # nothing written beside it
    assert optuna.load_study(study_name="s", storage=study_storage_url(run_dir)).study_name == "s"
