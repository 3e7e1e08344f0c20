"""The confirmation on test subjects, through real Ray Tune and Optuna on a micro setting; and the
guarantee that nothing before it reads a test subject."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from _fakes import make_dataset
from autopeft.data import read_manifest, split_scanner
from autopeft.report import write_report
from autopeft.runs import FAILED, FINISHED, INFEASIBLE, records, study_storage_url
from autopeft.report import SearchOutputs
from autopeft.runner import run_search
from autopeft.search.config import SearchConfig

pytestmark = pytest.mark.slow  # Ray Tune searches

PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 2, "folds": 1}


def _config(data, out, **overrides) -> SearchConfig:
    values = dict(backbone="cvtgan", budget="3%", preset="tiny", scanners=["1", "2"], trials=3, epochs=1, data=str(data),
                  out=str(out), pretrain_epochs=1, protocol=PROTOCOL, cpus_per_trial=1, concurrency=2, device="cpu",
                  references=True, portfolio=False, progress=False, priors=False, sampler="random", confirm=2,
                  confirm_seeds=2)
    values.update(overrides)
    return SearchConfig(**values)


def test_confirmation_scores_the_best_plans_the_best_baseline_and_references_on_test_subjects(ray_session, tmp_path):
    import optuna
    import pandas as pd

    data = make_dataset(tmp_path / "data", {"1": 6, "2": 6}, shape=(20, 18, 16), long_factor=1.5)
    # 0.4% of 3D CVT-GAN tiny: of PETITE's Table-1 rows only LayerNorm fits, so the portfolio is
    # LayerNorm at 3 learning rates (trials 0-2), then one plan of the sampler.
    protocol = dict(PROTOCOL, folds=2)
    run_dir = run_search(_config(data, tmp_path / "run", budget="0.4%", trials=4, protocol=protocol, portfolio=True),
                         outputs=SearchOutputs())
    summary = json.loads((run_dir / "summary.json").read_text())
    confirmation = summary["confirmation"]
    rows = {r["number"]: r for r in records(run_dir)}
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone

    ladder = load_space("cvtgan", build_backbone("cvtgan", "tiny").sites()).lr_values(3)
    assert [rows[n]["portfolio"] for n in range(3)] == [f"LayerNorm lr={lr:.2g}" for lr in ladder]
    meta = json.loads((run_dir / "run.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=study_storage_url(run_dir))
    assert [t.user_attrs.get("portfolio_name") for t in study.trials[:3]] == [rows[n]["portfolio"] for n in range(3)]

    ranked = sorted((r for r in rows.values() if r["state"] == FINISHED), key=lambda r: (-r["psnr"], r["number"]))
    baseline = next(r for r in ranked if r["portfolio"])
    searched = ranked[:2] + ([baseline] if baseline not in ranked[:2] else [])
    labels = [p["label"] for p in confirmation["plans"]]
    # The K best by validation, best first, the best baseline, then the references, on test subjects.
    assert labels == [f"#{r['number']}" for r in searched] + ["No-FT", "Full-FT", "PETITE"]
    assert confirmation["baseline"]["number"] == baseline["number"]
    # Seeds the search never trained with (it trained with --seed 0); folds 0 and 1.
    assert confirmation["split"] == "test" and confirmation["seeds"] == [1, 2] and confirmation["folds"] == [0, 1]
    assert confirmation["subjects"] == 4  # 2 test subjects x 2 targets
    recommended = confirmation["recommended"]
    assert recommended["number"] == ranked[0]["number"]  # best by validation, whatever its test result
    assert recommended["val"]["psnr"] == pytest.approx(ranked[0]["psnr"])
    if recommended["number"] != baseline["number"]:
        diff = recommended["vs_baseline"]["psnr"]
        assert diff["n"] == 4 and diff["folds"] == 2 and diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
    for plan in confirmation["plans"]:
        low, high = plan["test"]["psnr"]["ci"]
        assert low <= plan["test"]["psnr"]["mean"] <= high and plan["test"]["psnr"]["folds"] == 2
        if plan["label"] != "Full-FT":
            diff = plan["vs_Full-FT"]["psnr"]
            assert diff["n"] == 4 and diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
            assert math.isnan(diff["p"]) or 0 <= diff["p"] <= 1
    # Full-FT's rate was chosen on validation from its ladder; the confirmation runs that rate.
    references = json.loads((run_dir / "references.json").read_text())
    rungs = [r for r in references if r["plan"].get("full_ft")]
    chosen = next(r for r in rungs if r.get("chosen"))
    assert len(rungs) == 3 and chosen["label"] == "Full-FT" and chosen["psnr"] == max(r["psnr"] for r in rungs)
    full = next(p for p in confirmation["plans"] if p["label"] == "Full-FT")
    assert full["plan"]["train"]["lr"] == chosen["lr"]
    # Per-subject rows: searched plans and Full-FT/PETITE over 2 seeds, No-FT over one; 2 folds x
    # 2 pairs x 2 subjects each; every row says its split.
    frame = pd.read_csv(run_dir / "confirmation.csv")
    assert len(frame) == (len(searched) * 2 + 2 * 2 + 1) * 2 * 2 * 2 and set(frame["split"]) == {"test"}
    assert set(frame["subject"]) == {os.path.basename(p).split("_")[0] for p in _test_files_for(data, protocol)}
    # Recomputed from the rows: the recommended plan's test mean over (fold, subject) cells.
    cells = frame[frame["label"] == f"#{recommended['number']}"].groupby(["fold", "target", "subject"])["psnr"].mean()
    assert recommended["test"]["psnr"]["mean"] == pytest.approx(cells.mean())
    # The exact replay of the recommended trial, a reproducibility check outside the figures.
    replay = confirmation["replay"]
    assert replay["number"] == recommended["number"] and replay["max_abs_diff_db"] < 1e-2
    plan = yaml.safe_load((run_dir / "best_plan.yaml").read_text())
    assert f"trial #{recommended['number']}" in plan["description"] and "confirmed on test subjects" in plan["description"]
    assert "Table-1 baseline on validation" in plan["description"]
    assert summary["baseline"]["number"] == baseline["number"]
    html = write_report(run_dir).read_text()  # as `autopeft search` draws it after run_search
    assert "Confirmed on test subjects" in html and "Validation PSNR against test PSNR" in html
    assert "best Table-1 row, lr tuned" in html
    _check_gpu_check_report(run_dir, tmp_path)

    # Resuming redoes nothing that the confirmation kept.
    kept = {p: p.stat().st_mtime_ns for p in (run_dir / "confirmation").glob("*.json")}
    run_search(resume_dir=run_dir, outputs=SearchOutputs())
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "confirmation").glob("*.json")} == kept


def _check_gpu_check_report(run_dir, tmp_path) -> None:
    """scripts/gpu-check.sh's summary, read from this confirmed run (it needs no GPU to read one)."""
    from gpu_check_report import main, summarise

    from autopeft._io import cache_root
    from autopeft.report._results import confirmed_rows

    memory_log = tmp_path / "gpu-memory.csv"
    memory_log.write_text("1200\n3400\n2100\n")  # nvidia-smi's memory.used samples, MiB
    result = summarise(run_dir, memory_log=memory_log, cache=cache_root(), wall_seconds=12.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    pair_seconds = [p["seconds"] for r in records(run_dir) for p in r["pairs"]]  # 1 epoch per pair
    assert result["finetune_seconds_per_epoch"]["pairs"] == len(pair_seconds) > 0
    assert result["finetune_seconds_per_epoch"]["max"] == pytest.approx(max(pair_seconds))
    assert result["pretrain_seconds_per_epoch"] > 0 and result["peak_gpu_memory_mib"] == 3400
    assert result["slots"] and 0 < result["slots"][0]["busy_share"] <= 1
    assert result["table1"] == confirmed_rows(summary["confirmation"]) and result["amp"] is False
    written = tmp_path / "gpu-check.json"
    assert main([str(run_dir), "--memory-log", str(memory_log), "--json", str(written)]) == 0
    assert json.loads(written.read_text())["table1"] == result["table1"]


def test_nothing_reads_a_test_subject_before_the_confirmation(ray_session, tmp_path):
    # 5 subjects per scanner: pre-training uses the first 3 of each scanner's order, fine-tuning's
    # train/val the first 4 and its test subject the last: the test files are read by nothing but
    # the confirmation. They are overwritten with bytes no reader accepts, so any earlier read fails.
    data = make_dataset(tmp_path / "data", {"1": 5, "2": 5}, shape=(20, 18, 16), long_factor=1.5)
    protocol = dict(PROTOCOL, finetune_test=1)
    broken = _test_files_for(data, protocol)
    for path in broken:
        with open(path, "wb") as handle:
            handle.write(b"not a NIfTI file")
    with pytest.raises(Exception) as caught:
        run_search(_config(data, tmp_path / "run", protocol=protocol, confirm=1, confirm_seeds=1), outputs=SearchOutputs())
    # Pre-training, references, importance and every trial ran; the confirmation is what failed.
    run_dir = tmp_path / "run"
    rows = records(run_dir)
    assert sum(r["state"] != INFEASIBLE for r in rows) == 3 and not any(r["state"] == FAILED for r in rows)
    assert (run_dir / "references.json").is_file() and (run_dir / "results.csv").is_file()
    assert any(os.path.basename(path) in str(caught.value) for path in broken), str(caught.value)[:2000]


def _test_files_for(manifest_path, protocol) -> list[str]:
    from autopeft.data import Protocol

    manifest = read_manifest(str(manifest_path))
    return [path for target in ("1", "2")
            for record in split_scanner(manifest, target, purpose="finetune", protocol=Protocol(**protocol), fold=0, seed=0)["test"]
            for path in (record["short"], record["long"])]


def test_finetune_with_the_best_plan_reproduces_the_trial_validation_scores(ray_session, tmp_path, capsys):
    from autopeft.cli import main

    data = make_dataset(tmp_path / "data", {"1": 5, "2": 5}, shape=(20, 18, 16), long_factor=1.5)
    run_dir = run_search(_config(data, tmp_path / "run", trials=1, epochs=2, confirm=0, references=False,
                                 space=str(_ssf_space(tmp_path))), outputs=SearchOutputs())
    trial = next(r for r in records(run_dir) if r["state"] == FINISHED)
    pair = next(p for p in trial["pairs"] if (p["source"], p["target"]) == ("1", "2"))
    capsys.readouterr()
    # The plan file brings the run's data, preset, subject counts and source-model epochs.
    assert main(["finetune", "--backbone", "cvtgan", "--source", "1", "--target", "2", "--plan",
                 str(run_dir / "best_plan.yaml"), "--split", "val", "--quiet"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("best-cvtgan"))
    psnr, ssim = (float(value) for value in row.split()[3:5])
    assert "validation subjects" in out
    assert psnr == pytest.approx(pair["psnr"], abs=1e-3) and ssim == pytest.approx(pair["ssim"], abs=1e-4)


def _ssf_space(tmp_path):
    # One plan, trained for 2 epochs at a learning rate far from the preset's: the reproduction
    # must take the plan's rate, not the preset's.
    space = tmp_path / "space.yaml"
    space.write_text("backbone: cvtgan\ngroups:\n  dec:\n    sites: 'decoder.*.block*'\n    methods: {ssf: {}}\n"
                     "bitfit: [true]\nlr: [7.0e-3]\n")
    return space
