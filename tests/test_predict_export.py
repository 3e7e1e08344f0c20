"""predict and export on a run directory built by hand (what a search leaves: run.json, the cached
source model, best_weights/<source>-<target>-fold0/), without Ray: seconds, not minutes."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from _fakes import make_dataset
from autopeft.bundle import export_run
from autopeft.cli import main
from autopeft.data import Protocol, eval_volumes, read_manifest
from autopeft.errors import ConfigError
from autopeft.evaluation import evaluate
from autopeft.inference import predict_scans, scan_inputs
from autopeft.model_loading import load_bundle, load_model
from autopeft.peft import Plan, apply_plan, plan_state, save_trained
from autopeft.pretraining import pretrained_model

pytestmark = pytest.mark.slow  # pre-trains a source model for the run directories

PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_test": 2, "folds": 1}
MIXED = {"backbone": "unetr", "bitfit": True, "sites": {
    "encoder.vit.*": {"method": "lora", "rank": 2, "targets": ["q", "k"]},
    "encoder.cnn.*": {"method": "adapter", "reduction_factor": 4},
    "decoder.*": {"method": "ssf"}}}
MERGEABLE = {"backbone": "unetr", "bitfit": True, "sites": {
    "encoder.vit.*": {"method": "lora", "rank": 2, "targets": ["q", "k"]}, "decoder.*": {"method": "ssf"}}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-data")
    # 8 on the target: enough for a fine-tuning split with a validation block of the default size too.
    return make_dataset(root, {"1": 3, "2": 8}, shape=(20, 18, 16), long_factor=1.5)


def _run_dir(root, data, plan_data, *, confirmed=None, backbone="unetr"):
    """A run directory as a search writes it, with a fine-tuned (here: randomly moved) trained part;
    ``confirmed``: the recommended trial's number, its test PSNR confirmed (:func:`_confirm`)."""
    root.mkdir(parents=True)
    config = {"backbone": backbone, "preset": "tiny", "scanners": ["1", "2"], "folds": 1, "epochs": 1, "seed": 0,
              "protocol": PROTOCOL, "pretrain_epochs": 1, "data": str(data)}
    (root / "run.json").write_text(json.dumps({"config": config, "sessions": 1}))
    base, _ = pretrained_model(backbone, "1", manifest_path=data, epochs=1, protocol=Protocol(**PROTOCOL), progress=False)
    model = apply_plan(__import__("copy").deepcopy(base), Plan.from_dict(plan_data))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in plan_state(model).trainable_names:
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
    save_trained(model, plan_state(model).plan, root / "best_weights" / "1-2-fold0")
    if confirmed is not None:
        _confirm(root, confirmed)
    return root, model.eval()


def _confirm(root, number, best=None):
    """summary.json and confirmation.csv of a confirmation that recommended trial ``number`` (``best``
    by validation, the same when not given): test PSNR 31.0-32.0 for 1 -> 2 (two subjects, two
    seeds), 40 for a pair the bundle does not hold."""
    import pandas as pd

    rows = [{"label": f"#{number}", "number": number, "source": source, "target": target, "fold": 0, "seed": seed,
             "subject": subject, "psnr": psnr, "ssim": 0.9, "nrmse": 0.1}
            for source, target, subject, seed, psnr in (("1", "2", "a", 0, 31.0), ("1", "2", "a", 1, 31.2),
                                                        ("1", "2", "b", 0, 31.8), ("1", "2", "b", 1, 32.0),
                                                        ("2", "1", "c", 0, 40.0))]
    pd.DataFrame(rows).to_csv(root / "confirmation.csv", index=False)
    recommended = {"label": f"#{number}", "number": number, "test": {"psnr": {"mean": 34.0}}}  # the plan's, over pairs
    (root / "summary.json").write_text(json.dumps({"confirmation": {"recommended": recommended}, "best": {"number": number if best is None else best}}))


def test_predict_writes_outputs_on_the_input_grid_with_the_evaluations_psnr(data, tmp_path):
    run, tuned = _run_dir(tmp_path / "run", data, MIXED)
    loaded = load_model(run, target="2")
    assert loaded.source == "1" and loaded.target == "2"
    scans = scan_inputs(data, target="2")  # the manifest: only scanner 2's rows
    assert len(scans) == 8 and all(s.long for s in scans)
    results = predict_scans(loaded, scans, tmp_path / "out", progress=False)
    records = read_manifest(data)
    records = [r for r in records.to_dict("records") if r["scanner"] == "2"]
    for row, record in zip(results, records):
        given, written = nib.load(record["short"]), nib.load(row["output"])
        assert written.shape == given.shape and np.array_equal(written.affine, given.affine)
        assert written.header.get_xyzt_units() == given.header.get_xyzt_units()
        # The output, scaled back by its input's factor, is the clipped [0, 1] prediction: its PSNR
        # against the long scan is the evaluation's.
        figure = evaluate(tuned, eval_volumes([record]), roi_size=loaded.roi_size)
        assert row["psnr"] == pytest.approx(figure["psnr"], abs=1e-4)
        assert row["ssim"] == pytest.approx(figure["ssim"], abs=1e-4)
        rescaled = torch.from_numpy(np.asarray(written.dataobj, dtype=np.float32))[None] * row["scale"]
        from autopeft import metrics
        from autopeft.data.loading import scale_by_tissue_mean

        long = scale_by_tissue_mean(torch.from_numpy(np.asarray(nib.load(record["long"]).dataobj, dtype=np.float32))[None])
        assert metrics.psnr(rescaled[None], long[None]) == pytest.approx(figure["psnr"], abs=1e-3)


def test_outputs_are_in_the_inputs_units(data, tmp_path):
    run, _ = _run_dir(tmp_path / "run", data, MERGEABLE)
    short = read_manifest(data).iloc[3]["short"]  # scanner 2
    loaded = load_model(run, target="2")
    [plain] = predict_scans(loaded, scan_inputs(short), tmp_path / "a", progress=False)
    # The same scan in other units (x 1000): the output is the same image, x 1000.
    image = nib.load(short)
    scaled = tmp_path / "kilo.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32) * 1000, image.affine, image.header), scaled)
    [kilo] = predict_scans(loaded, scan_inputs(scaled), tmp_path / "b", progress=False)
    a = np.asarray(nib.load(plain["output"]).dataobj)
    b = np.asarray(nib.load(kilo["output"]).dataobj)
    np.testing.assert_allclose(b, 1000 * a, rtol=1e-3, atol=1e-2)  # float32 round-off


def test_predict_never_overwrites_an_input_and_asks_for_the_target(data, tmp_path):
    run, _ = _run_dir(tmp_path / "run", data, MERGEABLE)
    folder = tmp_path / "scans"
    folder.mkdir()
    source = read_manifest(data).iloc[3]["short"]
    (folder / "x_pred.nii.gz").write_bytes(open(source, "rb").read())
    (folder / "x.nii.gz").write_bytes(open(source, "rb").read())
    loaded = load_model(run)  # one target in the run: no --target needed
    with pytest.raises(ConfigError, match="would overwrite an input"):
        predict_scans(loaded, scan_inputs(folder), folder, progress=False)
    with pytest.raises(ConfigError, match="no trained part for --target 1"):
        load_model(run, target="1")


def test_a_scan_of_nans_is_named_and_leaves_no_empty_output_folder(data, tmp_path):
    from autopeft.errors import DataError

    run, _ = _run_dir(tmp_path / "run", data, MERGEABLE)
    image = nib.load(read_manifest(data).iloc[3]["short"])
    broken = tmp_path / "broken.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, np.nan, dtype=np.float32), image.affine), broken)
    with pytest.raises(DataError, match=rf"{broken}: the volume holds {int(np.prod(image.shape))} of .* NaN or infinite"):
        predict_scans(load_model(run), scan_inputs(broken), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    with pytest.raises(DataError):
        predict_scans(load_model(run), scan_inputs(broken), tmp_path / "kept", progress=False)
    assert (tmp_path / "kept").is_dir()


def test_export_merges_checks_and_writes_a_bundle_monai_accepts(data, tmp_path, capsys):
    run, tuned = _run_dir(tmp_path / "run", data, MIXED, confirmed=0)
    assert main(["export", str(run), "--target", "2", "--out", str(tmp_path / "bundle")]) == 0
    out = capsys.readouterr().out
    assert "not merged (not linear, kept as modules): encoder.cnn.* (adapter)" in out
    assert "merged outputs equal the unmerged model's on held-out scan" in out
    assert "31.500 dB (95% CI 31.100-31.900) on scanner 2's 2 test subjects (1 -> 2; 1 folds x 2 seeds)" in out
    bundle = tmp_path / "bundle"
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {
        "configs/metadata.json", "configs/inference.json", "models/model.safetensors", "docs/README.md"}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [32, 32, 32] and image["dtype"] == "float32"
    assert meta["autopeft"]["test_psnr"]["mean"] == pytest.approx(31.5) and meta["autopeft"]["plan"]["sites"]
    assert {k: meta["autopeft"]["test_psnr"][k] for k in ("split", "source", "target")} == {"split": "test", "source": "1", "target": "2"}
    assert meta["eval_metrics"] == {"test_psnr_db": pytest.approx(31.5), "split": "test", "pair": "1 -> 2"}
    assert 0 < meta["autopeft"]["trained_percent"] < 10 and meta["autopeft"]["unmerged_sites"] == ["encoder.cnn.* (adapter)"]
    for field in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
                  "description", "authors", "copyright", "changelog"):
        assert field in meta, field
    # The network MONAI's ConfigParser builds from the bundle, weights loaded, gives the run's outputs.
    rebuilt = load_bundle(bundle)
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(rebuilt.model(x), tuned(x), atol=1e-5)
    verify = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         "configs/metadata.json", "--config_file", "configs/inference.json", "--device", "cpu"],
        cwd=bundle, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-2000:]
    assert "verified with no error" in verify.stdout + verify.stderr


def test_a_fully_mergeable_plan_exports_plain_backbone_weights(data, tmp_path):
    from safetensors.torch import load_file

    from autopeft.backbones import build_backbone

    # LoRA + BitFit fold into the backbone's own tensors (SSF on a bias-free conv would add a bias).
    lora = {"backbone": "unetr", "bitfit": True, "sites": {"encoder.vit.*": {"method": "lora", "rank": 2, "targets": ["q", "k"]}}}
    run, tuned = _run_dir(tmp_path / "run", data, lora)
    done = export_run(run, tmp_path / "bundle", target="2")
    assert done["unmerged"] == [] and done["merge_diff"] < 1e-4 and done["parser_diff"] < 1e-5 and done["test_psnr"] is None
    plain = build_backbone("unetr", "tiny").state_dict()
    assert set(load_file(str(tmp_path / "bundle" / "models" / "model.safetensors"))) == set(plain)
    # ... which is also a model --weights accepts (a MONAI bundle folder).
    from autopeft.pretraining import imported_model

    imported, _ = imported_model(tmp_path / "bundle", "unetr", "tiny")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(imported(x), tuned(x), atol=1e-4)
    # predict with the bundle gives what predict with the run gives.
    scans = scan_inputs(data, target="2")[:1]
    a = predict_scans(load_model(run, target="2"), scans, tmp_path / "p1", progress=False)[0]
    b = predict_scans(load_model(tmp_path / "bundle"), scans, tmp_path / "p2", progress=False)[0]
    assert b["psnr"] == pytest.approx(a["psnr"], abs=1e-4)


def test_a_cvtgan_plan_with_vpt_is_exported_unmerged_and_says_which(data, tmp_path):
    from autopeft.peft import load_plan

    plan = load_plan("petite-cvtgan").to_dict()
    run, tuned = _run_dir(tmp_path / "run", data, plan, backbone="cvtgan")
    done = export_run(run, tmp_path / "bundle", target="2")
    assert done["unmerged"] and all("(vpt)" in site for site in done["unmerged"])
    assert done["merge_diff"] < 1e-4 and done["parser_diff"] < 1e-5
    rebuilt = load_bundle(tmp_path / "bundle").model
    assert rebuilt.discriminator is None  # inference does not need it; the file does not hold it
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), tuned(x), atol=1e-5)


def test_a_trained_plan_folder_loads_inside_its_run_or_with_the_weights_it_came_from(data, tmp_path):
    import shutil

    from autopeft.checkpoints import save_checkpoint

    run, tuned = _run_dir(tmp_path / "run", data, MERGEABLE)
    inside = load_model(run / "best_weights" / "1-2-fold0")  # finds its run, and the run's source model
    assert inside.target == "2" and inside.source == "1"
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / "best_weights" / "1-2-fold0", outside)
    with pytest.raises(ConfigError, match="pass the pre-trained model it was fine-tuned from with --weights"):
        load_model(outside)
    base, _ = pretrained_model("unetr", "1", manifest_path=data, epochs=1, protocol=Protocol(**PROTOCOL), progress=False)
    save_checkpoint(base, tmp_path / "base.safetensors", {})
    loaded = load_model(outside, weights=tmp_path / "base.safetensors")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), tuned(x), atol=1e-6)


def test_a_confirmed_run_exports_the_recommended_trials_weights_not_the_best_by_validation(data, tmp_path):
    import shutil

    run, recommended = _run_dir(tmp_path / "run", data, MERGEABLE)
    _confirm(run, 7, best=3)
    shutil.move(str(run / "best_weights"), str(run / "weights" / "0007"))
    other, _ = _run_dir(tmp_path / "other", data, MIXED)  # best by validation: another plan
    shutil.copytree(other / "best_weights", run / "best_weights")
    loaded = load_model(run, target="2")
    assert loaded.extra["trial"] == 7 and loaded.plan["sites"].keys() == MERGEABLE["sites"].keys()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), recommended(x), atol=1e-6)
    done = export_run(run, tmp_path / "bundle", target="2")
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert done["unmerged"] == [] and meta["autopeft"]["trial"] == 7
    assert meta["autopeft"]["test_psnr"]["mean"] == pytest.approx(31.5) and meta["autopeft"]["test_psnr"]["trial"] == 7
