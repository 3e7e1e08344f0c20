"""The finetune and importance commands end to end on a tiny fake data set (real training)."""

from __future__ import annotations

import json

import pytest

from _fakes import make_dataset
from autopeft.cli import main
from autopeft.cli.finetune import _plan_names


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    make_dataset(root, {"1": 16, "2": 16}, shape=(20, 18, 16), long_factor=1.5)
    return root


def test_table1_expands_to_petite_rows():
    class Args:
        backbone, method, plan = "cvtgan", None, "table1"

    names = _plan_names(Args)
    assert names[0] == "cvtgan-noft" and names[1] == "cvtgan-fullft" and names[-1] == "petite-cvtgan"
    assert len(names) == 9


@pytest.mark.slow  # trains
def test_finetune_runs_plans_and_saves(data_dir, tmp_path, capsys):
    code = main(["finetune", "--backbone", "unetr", "--source", "1", "--target", "2", "--data", str(data_dir),
                 "--method", "none", "--plan", "petite-unetr", "--epochs", "1", "--pretrain-epochs", "1",
                 "--save", str(tmp_path / "saved"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Identity (input)" in out and "unetr-noft" in out and "petite-unetr" in out
    assert (tmp_path / "saved" / "petite-unetr").is_dir()
    assert not (tmp_path / "saved" / "unetr-noft").exists()  # nothing trained, nothing saved


def test_finetune_scores_validation_unless_told_test(tmp_path, capsys):
    import torch

    from autopeft.data import split_scanner
    from autopeft.finetuning import finetune
    from autopeft.backbones import build_backbone

    manifest = make_dataset(tmp_path / "data", {"1": 1, "2": 16}, shape=(20, 18, 16), long_factor=1.5)
    torch.manual_seed(0)
    model = build_backbone("unetr", "tiny")
    torch.save(model.state_dict(), tmp_path / "mine.pt")  # a user's model: nothing is pre-trained
    # Nothing may read the target's test subjects unless asked: their scans are gone.
    held_out = split_scanner(manifest, "2", purpose="finetune", fold=0, seed=0)
    for row in held_out["test"]:
        for column in ("short", "long"):
            (tmp_path / "data" / row[column]).unlink()
    common = ["finetune", "--backbone", "unetr", "--source", "1", "--target", "2", "--data", str(manifest),
              "--weights", str(tmp_path / "mine.pt"), "--method", "none", "--quiet"]
    assert main(common) == 0
    assert "validation subjects of the target" in capsys.readouterr().out
    with pytest.raises(RuntimeError) as info:  # asked for test, it reads them: the check above can fail
        main([*common, "--split", "test"])
    missing = {row["short"] for row in held_out["test"]}
    assert any(path in str(info.value.__cause__) for path in missing)
    # The library's building block defaults to validation too.
    result = finetune(model, "2", manifest=manifest, method="none", prepare=lambda m: (0, 1), epochs=0, lr=0.0,
                      progress=False)
    assert set(result.subjects) == {"val"}
    assert {r["subject"] for r in result.subjects["val"]} == {r["subject"] for r in held_out["val"]}


def test_bad_plan_name_fails_before_training(data_dir, capsys):
    code = main(["finetune", "--backbone", "unetr", "--source", "1", "--target", "2", "--data", str(data_dir),
                 "--plan", "no-such-plan", "--quiet"])
    assert code == 2
    assert "no-such-plan" in capsys.readouterr().err


def test_plan_for_another_backbone_is_refused(data_dir, capsys):
    code = main(["finetune", "--backbone", "unetr", "--source", "1", "--target", "2", "--data", str(data_dir),
                 "--plan", "petite-cvtgan", "--quiet"])
    assert code == 2
    assert "is for backbone 'cvtgan'" in capsys.readouterr().err


def test_same_source_and_target_is_refused(data_dir, capsys):
    assert main(["finetune", "--backbone", "unetr", "--source", "1", "--target", "1", "--data", str(data_dir)]) == 2


@pytest.mark.slow  # trains
def test_importance_writes_per_site_json(data_dir, tmp_path, capsys):
    out = tmp_path / "imp.json"
    code = main(["importance", "--backbone", "cvtgan", "--source", "1", "--target", "2", "--data", str(data_dir),
                 "--pretrain-epochs", "1", "--out", str(out), "--top", "3", "--quiet"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["variant"] == "l2" and payload["lambda"] == 1.0
    shares = [site["share"] for site in payload["sites"]]
    assert all(0 <= s <= 1 for s in shares) and 0 < sum(shares) <= 1 + 1e-6
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3 + 2
