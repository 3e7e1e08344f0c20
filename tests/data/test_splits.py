from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from autopeft.data.splits import Protocol, scanners_in, split_scanner
from autopeft.errors import DataError


def _frame(subjects_per_scanner: dict[str, int]) -> pd.DataFrame:
    """A manifest frame without files: splitting never opens scans."""
    rows = [
        {
            "subject": f"s{index:02d}",
            "scanner": scanner,
            "short": f"/d/{scanner}/{index}_s.nii",
            "long": f"/d/{scanner}/{index}_l.nii",
        }
        for scanner, count in subjects_per_scanner.items()
        for index in range(count)
    ]
    frame = pd.DataFrame(rows, index=range(2, 2 + len(rows)))
    frame.attrs["manifest"] = "/d/manifest.csv"
    return frame


def _subjects(split: list[dict[str, str]]) -> set[str]:
    return {record["subject"] for record in split}


def test_protocol_defaults_and_paper_sizes() -> None:
    assert Protocol().sizes("pretrain") == {"train": 8, "val": 4}
    assert Protocol().sizes("finetune") == {"train": 4, "val": 4, "test": 8}
    paper = Protocol.paper()
    # PETITE's 10 fine-tuning / 15 held-out subjects, the held-out ones split 5 validation + 10 test.
    assert (paper.pretrain_train, paper.pretrain_val, paper.finetune_train, paper.finetune_val, paper.finetune_test,
            paper.folds) == (30, 15, 10, 5, 10, 3)
    assert paper.needed("pretrain") == 45 and paper.needed("finetune") == 25 == 10 + 15


@pytest.mark.parametrize("field", ["pretrain_train", "pretrain_val", "finetune_train", "finetune_val", "finetune_test", "folds"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_protocol_rejects_non_positive_sizes(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{field}` must be a positive integer"):
        Protocol(**{field: value})


@pytest.mark.parametrize(("purpose", "names"), [("pretrain", ["train", "val"]), ("finetune", ["train", "val", "test"])])
def test_split_has_right_names_sizes_and_records(purpose: str, names: list[str]) -> None:
    frame = _frame({"1": 18, "2": 18})
    splits = split_scanner(frame, 2, purpose=purpose)  # int id matches the string "2"
    assert sorted(splits) == sorted(names)
    sizes = Protocol().sizes(purpose)
    for name in names:
        assert len(splits[name]) == sizes[name]
        for record in splits[name]:
            assert set(record) == {"subject", "scanner", "short", "long"}
            assert record["scanner"] == "2"
            assert record["short"] == f"/d/2/{int(record['subject'][1:])}_s.nii"
        assert [r["subject"] for r in splits[name]] == sorted(r["subject"] for r in splits[name])
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not _subjects(splits[first]) & _subjects(splits[second])


def test_split_is_deterministic_and_seed_dependent() -> None:
    frame = _frame({"A": 20})
    first = split_scanner(frame, "A", purpose="finetune", seed=3)
    assert first == split_scanner(frame, "A", purpose="finetune", seed=3)
    others = [split_scanner(frame, "A", purpose="finetune", seed=seed) for seed in range(4, 8)]
    assert any(other != first for other in others)


def test_test_subjects_are_the_same_in_every_fold_and_never_trained_or_validated_on() -> None:
    frame = _frame({"A": 16})
    folds = [split_scanner(frame, "A", purpose="finetune", fold=k, seed=1) for k in range(3)]
    tests = [_subjects(fold["test"]) for fold in folds]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 8
    seen = set().union(*(_subjects(fold["train"]) | _subjects(fold["val"]) for fold in folds))
    assert seen.isdisjoint(tests[0])  # no fold chooses or trains on any fold's test subjects
    assert seen == {f"s{i:02d}" for i in range(16)} - tests[0]


def test_folds_rotate_validation_disjointly_when_there_are_enough() -> None:
    protocol = Protocol(finetune_train=4, finetune_val=5, finetune_test=2, folds=3)
    frame = _frame({"A": 17})
    folds = [split_scanner(frame, "A", purpose="finetune", protocol=protocol, fold=k, seed=1) for k in range(3)]
    validation = [_subjects(fold["val"]) for fold in folds]
    assert all(validation[i].isdisjoint(validation[j]) for i in range(3) for j in range(i + 1, 3))
    assert len(set().union(*validation)) == 15  # every non-test subject is validated on once
    for fold in folds:
        assert _subjects(fold["train"]).isdisjoint(_subjects(fold["val"]))


def test_folds_rotate_even_when_validation_sets_must_overlap() -> None:
    frame = _frame({"A": 16})  # default protocol: 8 test, then 4 val + 4 train use every other subject
    folds = [split_scanner(frame, "A", purpose="finetune", fold=k) for k in range(3)]
    validation = [frozenset(_subjects(fold["val"])) for fold in folds]
    assert len(set(validation)) == 3
    for fold in folds:
        assert len(_subjects(fold["train"]) | _subjects(fold["val"]) | _subjects(fold["test"])) == 16


def test_pretrain_folds_rotate_validation() -> None:
    frame = _frame({"A": 12})
    folds = [split_scanner(frame, "A", purpose="pretrain", fold=k) for k in range(3)]
    assert len({frozenset(_subjects(fold["val"])) for fold in folds}) == 3


def test_too_few_subjects_says_needed_found_and_fix() -> None:
    frame = _frame({"1": 14, "5": 9})
    with pytest.raises(DataError) as caught:
        split_scanner(frame, "5", purpose="pretrain")
    message = str(caught.value)
    assert "scanner '5'" in message and "/d/manifest.csv" in message
    assert "has 9 subjects" in message and "needs 12 (8 train + 4 val)" in message
    assert "fewer subjects per split" in message and "add subjects" in message


def test_unknown_scanner_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="scanner '3' is not in /d/manifest.csv; its scanners are 1, 2, 10"):
        split_scanner(_frame({"10": 12, "2": 12, "1": 12}), "3", purpose="finetune")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fold": 3}, "`fold` must be an integer in"),
        ({"fold": -1}, "`fold` must be an integer in"),
        ({"purpose": "train"}, "`purpose` must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments = {"purpose": "finetune", **kwargs}
    with pytest.raises(ValueError, match=message):
        split_scanner(_frame({"A": 12}), "A", **arguments)  # type: ignore[arg-type]


def test_scanners_in_sorts_naturally() -> None:
    assert scanners_in(_frame({"10": 1, "2": 1, "1": 1, "b": 1})) == ["1", "2", "10", "b"]


def test_split_reads_a_manifest_path(tmp_path: Path) -> None:
    lines = ["subject,scanner,short,long"] + [f"s{i},A,s{i}.nii,l{i}.nii" for i in range(16)]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    splits = split_scanner(tmp_path / "manifest.csv", "A", purpose="finetune")
    assert splits["test"][0]["short"].startswith(str(tmp_path))
    assert scanners_in(tmp_path) == ["A"]
