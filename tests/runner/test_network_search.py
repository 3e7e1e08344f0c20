"""A user's own network through the whole path, on real Ray Tune and Optuna at a micro setting:
MONAI's BasicUNet by reference (search with the confirmation, export, predict from the exported
bundle), and a MONAI bundle folder written here (searched from its own weights, exported back as a
bundle that `python -m monai.bundle verify_net_in_out` accepts)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from autopeft.cli import main
from autopeft.data.simulator import simulate
from autopeft.runs import FINISHED, INFEASIBLE, records
from autopeft.report import SearchOutputs
from autopeft.runner import run_search
from autopeft.search.config import SearchConfig
from autopeft.backbones.network import network_ref, register_network

# user_network first: its $PYTHONPATH must be set before this module's Ray starts.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("user_network", "networks_env")]  # Ray Tune searches

PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 1, "folds": 1}
NET_ARGS = {"features": [4, 4, 8, 8, 16, 4]}




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The built-in simulator's scanners 1 and 5, three subjects each, at a test size."""
    root = tmp_path_factory.mktemp("builtin-scanners")
    return simulate(root, subjects=3, size=32, scanners="1,5", seed=0, progress=False)


def _config(backbone, preset, data, out, **overrides) -> SearchConfig:
    values = dict(backbone=backbone, preset=preset, budget="5%", scanners=["1", "5"], trials=3, epochs=1, data=str(data),
                  out=str(out), pretrain_epochs=1, protocol=PROTOCOL, cpus_per_trial=1, concurrency=2, device="cpu",
                  progress=False, confirm=1, confirm_folds=1, confirm_seeds=1)
    values.update(overrides)
    return SearchConfig(**values)


def test_basicunet_search_confirm_export_predict(ray_session, data, tmp_path, capsys):
    backbone, preset = register_network(network_ref("monai:BasicUNet", net_args=NET_ARGS))
    started = time.perf_counter()
    run_dir = run_search(_config(backbone, preset, data, tmp_path / "run", progress=True), outputs=SearchOutputs())
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    print(f"BasicUNet search wall time: {seconds:.1f} s")
    assert "baseline portfolio: skipped" in printed
    # The run prints its own progress: not Tune's banner, TensorBoard hint or logger warnings.
    assert "Configuration for experiment" not in printed and "tensorboard" not in printed.lower()
    # The network travels with the run: another process (and predict/export) rebuilds it from there.
    saved = json.loads((run_dir / "network.json").read_text())
    assert saved["spec"] == "monai:BasicUNet" and saved["net_args"] == NET_ARGS
    rows = records(run_dir)
    assert any(r["state"] == FINISHED for r in rows)
    assert all(r["plan"]["backbone"] == "monai:BasicUNet" for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["confirmation"]["recommended"]["label"]
    space_groups = {name.split(".")[0] for r in rows for name in r["params"] if name.endswith(".method")}
    assert {"encoder", "decoder"} <= space_groups  # auto-grouped: role.kind.stage groups

    bundle = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--target", "5", "--out", str(bundle)]) == 0
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    if metadata["autopeft"]["merged"]:
        # Merged into plain weights: the bundle's network is the user's own BasicUNet.
        assert inference["network_def"]["_target_"] == "monai.networks.nets.basic_unet.BasicUNet"
    else:
        assert json.loads(inference["network_def"]["network"])["spec"] == "monai:BasicUNet"

    from autopeft.data import read_manifest

    manifest = read_manifest(data)
    scans = list(manifest[manifest["scanner"].astype(str) == "5"]["short"])
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(bundle), "--input", str(scans[0]), "--out", str(out)]) == 0
    written = list(out.glob("*.nii.gz"))
    assert len(written) == 1
    source, pred = nib.load(str(scans[0])), nib.load(str(written[0]))
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert np.isfinite(np.asarray(pred.dataobj)).all()


def _write_bundle(root, data) -> None:
    """A MONAI bundle folder as a user has one: network_def, metadata, and weights trained elsewhere
    (here: a BasicUNet nudged away from its initialisation)."""
    from monai.networks.nets import BasicUNet
    from safetensors.torch import save_file

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    network_def = {"_target_": "BasicUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                   "features": "@features"}
    (root / "configs" / "inference.json").write_text(json.dumps({"features": NET_ARGS["features"], "network_def": network_def}))
    fmt = {"type": "image", "format": "magnitude", "num_channels": 1, "spatial_shape": [32, 32, 32], "dtype": "float32",
           "value_range": [0, 1], "is_patch_data": True, "channel_def": {"0": "image"}}
    (root / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.1.0", "network_data_format": {"inputs": {"image": fmt}, "outputs": {"pred": fmt}}}))
    torch.manual_seed(3)
    net = BasicUNet(3, 1, 1, features=NET_ARGS["features"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "models" / "model.safetensors"))


def test_a_users_installed_class_is_searched_in_ray_workers(ray_session, data, tmp_path, user_network):
    """module.path:Class: the reference travels to the trials' processes, which import the class."""
    backbone, preset = register_network(network_ref(user_network, net_args={"width": 4}))
    # No ASHA: both trials train every pair, whatever the order they finish in.
    run_dir = run_search(_config(backbone, preset, data, tmp_path / "run", trials=2, confirm=0, references=False,
                                 portfolio=False, asha=False), outputs=SearchOutputs())
    # Draws over the budget are recorded INFEASIBLE and never reach a worker (the sampler alone
    # draws them; priors are off by default); the two trials that train both finish.
    rows = [r for r in records(run_dir) if r["state"] != INFEASIBLE]
    assert [r["state"] for r in rows] == [FINISHED, FINISHED]
    assert all(r["plan"]["backbone"] == user_network and r["trainable"] > 0 for r in rows)
    assert json.loads((run_dir / "network.json").read_text())["spec"] == user_network


def test_a_bundle_folder_searched_from_its_weights_and_exported_back(ray_session, data, tmp_path):
    user_bundle = tmp_path / "user_bundle"
    _write_bundle(user_bundle, data)
    ref = network_ref(f"bundle:{user_bundle}")
    assert ref.crop == (32, 32, 32) and ref.network_def()["_target_"] == "BasicUNet"  # from its metadata and config
    backbone, preset = register_network(ref)
    # Linear methods only (a space file cut from the generated one): the export merges every plan.
    import yaml

    from autopeft.search.auto_space import auto_space
    from autopeft.backbones import build_backbone

    space, _ = auto_space(build_backbone(backbone, preset), "auto-grouped")
    for group in space["groups"].values():
        group["methods"] = {m: o for m, o in group["methods"].items() if m in ("none", "lora", "ssf")}
    space_file = tmp_path / "linear.yaml"
    space_file.write_text(yaml.safe_dump(space))
    run_dir = run_search(_config(backbone, preset, data, tmp_path / "run", weights=str(user_bundle), source="1",
                                 references=False, portfolio=False, space=str(space_file)), outputs=SearchOutputs())
    assert any(r["state"] == FINISHED for r in records(run_dir))
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--target", "5", "--out", str(out)]) == 0
    # The user's own network_def (and what it refers to), with merged weights under its own names.
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["network_def"] == json.loads((user_bundle / "configs" / "inference.json").read_text())["network_def"]
    assert inference["features"] == NET_ARGS["features"]
    from monai.networks.nets import BasicUNet
    from safetensors.torch import load_file

    weights = load_file(str(out / "models" / "model.safetensors"))
    assert set(weights) == set(BasicUNet(3, 1, 1, features=NET_ARGS["features"]).state_dict())
    check = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         str(out / "configs" / "metadata.json"), "--config_file", str(out / "configs" / "inference.json")],
        capture_output=True, text=True, cwd=out)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
