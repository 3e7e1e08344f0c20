"""From BIDS-PET to a MONAI bundle through the command line: simulate --bids -> data --bids ->
search (real Ray Tune + Optuna, 2 trials) -> predict -> export -> MONAI's verify_net_in_out; then
search --weights with a user's own state dict. A few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from autopeft.cli import main

pytestmark = pytest.mark.slow  # a whole search through Ray

TARGET = "Siemens Biograph mCT class"  # the simulator's scanner 1, as its sidecars name it


@pytest.fixture(scope="module")
def ray_env():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only: no token file for a throwaway local cluster
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_bids_to_search_to_predict_to_bundle(ray_env, tmp_path, capsys):
    sim, pairs, run, pred, bundle = (tmp_path / name for name in ("sim", "pairs", "run", "pred", "bundle"))
    # 16 subjects per scanner: enough for the default protocol's pre-training and fine-tuning splits.
    assert main(["simulate", "--out", str(sim), "--bids", "--size", "16", "--subjects", "16", "--scanners", "1,2", "--quiet"]) == 0
    assert main(["data", "--bids", str(sim), "--short", "0-5", "--long", "0-30", "--out", str(pairs), "--quiet"]) == 0
    capsys.readouterr()
    from autopeft.cli import build_parser

    search_options = build_parser()._subparsers._group_actions[0].choices["search"]._option_string_actions
    no_confirmation = ["--confirm", "0"] if "--confirm" in search_options else []  # where the flag exists
    assert main(["search", "--backbone", "unetr", "--budget", "1%", "--data", str(pairs), "--trials", "2", "--epochs", "1",
                 "--pretrain-epochs", "2", "--no-references", "--no-asha", "--device", "cpu", "--out", str(run), "--quiet",
                 *no_confirmation]) == 0
    out = capsys.readouterr().out
    # Defaults follow the data: its two scanners (named by the sidecars), with the reason.
    assert f"scanners: Siemens Biograph TruePoint class (16 subjects), {TARGET} (16 subjects): the two scanners with the most subjects" in out
    assert (run / "best_plan.yaml").is_file() and any((run / "best_weights").iterdir())

    assert main(["predict", "--model", str(run), "--target", TARGET, "--input", str(pairs / "manifest.csv"),
                 "--out", str(pred), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mean of 16" in out
    results = json.loads((pred / "predictions.json").read_text())
    assert len(results) == 16
    for row in results:
        given, written = nib.load(row["input"]), nib.load(row["output"])
        assert written.shape == given.shape and np.array_equal(written.affine, given.affine)
        assert np.isfinite(row["psnr"])

    assert main(["export", str(run), "--target", TARGET, "--out", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "merged outputs equal the unmerged model's" in out and "no confirmed test PSNR" in out
    verify = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         "configs/metadata.json", "--config_file", "configs/inference.json", "--device", "cpu"],
        cwd=bundle, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-2000:]
    # The bundle predicts what the run predicts.
    assert main(["predict", "--model", str(bundle), "--input", results[0]["input"], "--out", str(tmp_path / "p2"), "--quiet"]) == 0
    a = np.asarray(nib.load(results[0]["output"]).dataobj)
    b = np.asarray(nib.load(next((tmp_path / "p2").glob("*.nii.gz"))).dataobj)
    # Merged weights sum in another float32 order: the export's own check allows 1e-4 (bundle._MERGE_ATOL).
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)

    # search --weights: a user's own model of one scanner, fine-tuned from it to the other.
    from autopeft.report import SearchOutputs
    from autopeft.runner import run_search
    from autopeft.search.config import SearchConfig
    from autopeft.runs import records
    from autopeft.backbones import build_backbone

    torch.manual_seed(0)
    torch.save(build_backbone("unetr", "tiny").state_dict(), tmp_path / "mine.pt")
    with pytest.raises(Exception, match="`weights` and `source` go together"):
        SearchConfig(backbone="unetr", budget="1%", weights=str(tmp_path / "mine.pt"))
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    mine = run_search(SearchConfig(backbone="unetr", budget="1%", data=str(pairs), trials=1, epochs=1, device="cpu",
                                   references=False, asha=False, progress=False, out=str(tmp_path / "run-mine"),
                                   weights=str(tmp_path / "mine.pt"), source=TARGET, priors=False,
                                   **({"confirm": 0} if "confirm" in fields else {})), outputs=SearchOutputs())
    pairs_run = {(p["source"], p["target"]) for r in records(mine) for p in r.get("pairs", [])}
    assert pairs_run == {(TARGET, "Siemens Biograph TruePoint class")}
    cache = os.environ["AUTOPEFT_CACHE"]
    assert any(name.startswith("imported-unetr-tiny-") for name in os.listdir(os.path.join(cache, "pretrained")))
    assert json.loads((mine / "run.json").read_text())["config"]["weights"] == str(tmp_path / "mine.pt")
