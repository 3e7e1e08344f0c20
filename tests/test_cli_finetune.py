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
