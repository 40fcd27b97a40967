"""Limited-label splits on a fake preprocessed dataset (empty case files are enough: only names are read)."""
import json
import sys

import numpy as np
import pytest

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.pool import list_pool
from nnunet_cl.splits import main_limited_split, write_limited_splits

DI = "nnUNetPlans_3d_fullres"
CASES = [f"case_{i:03d}" for i in range(15)]


@pytest.fixture
def dataset(nnunet_env):
    """nnUNet_preprocessed/Dataset960_Split with 15 cases in the 3d_fullres folder, no splits file yet."""
    folder = nnunet_env["nnUNet_preprocessed"] / "Dataset960_Split"
    (folder / DI).mkdir(parents=True)
    for c in CASES:
        for ending in (".b2nd", "_seg.b2nd", ".pkl"):
            (folder / DI / (c + ending)).touch()
    return folder


def nnunet_default_splits():
    """What nnUNetTrainer.do_split writes when splits_final.json is missing."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    return generate_crossval_split(list(np.sort(CASES)), seed=12345, n_splits=5)


def read(folder, name="splits_final.json"):
    return json.loads((folder / name).read_text())


def test_k_per_fold_with_nnunet_validation(dataset):
    splits = write_limited_splits(str(dataset), k=5, seed=0)
    assert read(dataset) == splits
    reference = nnunet_default_splits()
    assert len(splits) == 5
    meta = read(dataset, "splits_limited.json")
    for fold, (s, ref) in enumerate(zip(splits, reference)):
        assert set(s) == {"train", "val"}  # nothing nnU-Net does not expect
        assert s["val"] == [str(v) for v in ref["val"]]
        assert len(s["train"]) == 5 and len(set(s["train"])) == 5
        assert set(s["train"]) <= set(ref["train"]) and not set(s["train"]) & set(s["val"])
        assert sorted(meta["unused_train"][fold] + s["train"]) == sorted(map(str, ref["train"]))
    assert meta["k"] == 5 and meta["seed"] == 0 and meta["k_per_fold"] == [5] * 5
    # all validation sets together are every case once, as in nnU-Net's 5-fold CV
    assert sorted(v for s in splits for v in s["val"]) == CASES


def test_fraction(dataset):
    splits = write_limited_splits(str(dataset), fraction=0.25, seed=3)
    for s, ref in zip(splits, nnunet_default_splits()):
        assert len(s["train"]) == round(0.25 * len(ref["train"]))
    tiny = write_limited_splits(str(dataset), fraction=0.01, seed=3)
    assert all(len(s["train"]) == 1 for s in tiny)  # at least one labeled case
    full = write_limited_splits(str(dataset), fraction=1.0, seed=3)
    assert [sorted(s["train"]) for s in full] == [sorted(map(str, r["train"])) for r in nnunet_default_splits()]


def test_seeded_and_nested(dataset):
    a = write_limited_splits(str(dataset), k=5, seed=7)
    b = write_limited_splits(str(dataset), k=5, seed=7)
    assert a == b
    c = write_limited_splits(str(dataset), k=5, seed=8)
    assert any(set(x["train"]) != set(y["train"]) for x, y in zip(a, c))
    assert [x["val"] for x in a] == [y["val"] for y in c]
    # nested: each smaller draw is a subset of the larger one, whatever order the runs come in
    k10 = write_limited_splits(str(dataset), k=10, seed=7)
    k2 = write_limited_splits(str(dataset), k=2, seed=7)
    k5 = write_limited_splits(str(dataset), k=5, seed=7)
    for s2, s5, s10 in zip(k2, k5, k10):
        assert set(s2["train"]) < set(s5["train"]) < set(s10["train"])
    assert k5 == a


def test_previous_splits_are_backed_up(dataset):
    custom = [{"train": CASES[3:], "val": CASES[:3]}, {"train": CASES[:12], "val": CASES[12:]}]
    (dataset / "splits_final.json").write_text(json.dumps(custom))
    splits = write_limited_splits(str(dataset), k=2, num_folds=2)
    assert [s["val"] for s in splits] == [CASES[:3], CASES[12:]]  # an existing file's validation sets are kept
    assert all(set(s["train"]) <= set(c["train"]) for s, c in zip(splits, custom))
    backups = sorted(dataset.glob("splits_final.json.bak_*"))
    assert len(backups) == 1 and json.loads(backups[0].read_text()) == custom
    again = write_limited_splits(str(dataset), k=4, num_folds=2)
    backups = sorted(dataset.glob("splits_final.json.bak_*"))
    assert len(backups) == 2 and splits in [json.loads(b.read_text()) for b in backups]
    assert read(dataset, "splits_limited.json")["source_splits"] == custom
    assert all(set(s["train"]) <= set(c["train"]) for s, c in zip(again, custom))
    with pytest.raises(NnUNetCLError, match="--folds 2"):
        write_limited_splits(str(dataset), k=2, num_folds=5)


def test_no_backup_without_previous_file(dataset):
    write_limited_splits(str(dataset), k=3)
    assert list(dataset.glob("splits_final.json.bak_*")) == []
    assert read(dataset, "splits_limited.json")["backup_of_previous_splits"] is None


def test_pool_keeps_unused_training_cases(dataset):
    splits = write_limited_splits(str(dataset), k=2, seed=1)
    unused = read(dataset, "splits_limited.json")["unused_train"]
    for fold in range(5):
        ids = {i for _, i in list_pool(str(dataset), DI, fold)}
        assert set(unused[fold]) <= ids and set(splits[fold]["train"]) <= ids
        assert not ids & set(splits[fold]["val"])
        assert ids == set(CASES) - set(splits[fold]["val"])
    assert {i for _, i in list_pool(str(dataset), DI, "all")} == set(CASES)


def test_bad_arguments(dataset):
    with pytest.raises(NnUNetCLError, match="exactly one"):
        write_limited_splits(str(dataset))
    with pytest.raises(NnUNetCLError, match="exactly one"):
        write_limited_splits(str(dataset), k=2, fraction=0.5)
    with pytest.raises(NnUNetCLError, match="fraction"):
        write_limited_splits(str(dataset), fraction=1.5)
    with pytest.raises(NnUNetCLError, match="positive"):
        write_limited_splits(str(dataset), k=0)
    with pytest.raises(NnUNetCLError, match="-k 12 or less"):
        write_limited_splits(str(dataset), k=13)
    assert not (dataset / "splits_final.json").exists()  # a failed call writes nothing
    with pytest.raises(NnUNetCLError, match="nnUNetv2_plan_and_preprocess"):
        write_limited_splits(str(dataset.parent / "Dataset961_Missing"), k=2)
    empty = dataset.parent / "Dataset962_Empty"
    empty.mkdir()
    with pytest.raises(NnUNetCLError, match="No preprocessed cases"):
        write_limited_splits(str(empty), k=2)


def test_cli(dataset, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_limited_split", "-d", "Dataset960_Split", "-k", "3", "--seed", "2"])
    main_limited_split()
    out = capsys.readouterr().out
    assert "fold 0: 3 train, 3 val, 9 unused" in out
    assert read(dataset) == write_limited_splits(str(dataset), k=3, seed=2)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_limited_split", "-d", "Dataset960_Split", "-f", "0.5"])
    main_limited_split()
    assert "Previous splits kept in" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_limited_split", "-d", "Dataset999_Nope", "-k", "3"])
    with pytest.raises(SystemExit, match="error: Dataset 'Dataset999_Nope' does not exist"):
        main_limited_split()


def test_fewer_than_two_folds_is_a_clear_error(dataset, monkeypatch):
    """--folds 0 or 1 used to end in scikit-learn's KFold traceback; now it is a message with the fix."""
    for folds in ("0", "1"):
        monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_limited_split", "-d", "Dataset960_Split", "-k", "2",
                                          "--folds", folds])
        with pytest.raises(SystemExit, match=rf"^nnUNetv2_cl_limited_split: error: --folds must be an integer of at "
                                             rf"least 2 .*got {folds}\. Fix: use --folds 5"):
            main_limited_split()
    assert not (dataset / "splits_final.json").exists()


def test_load_plans_reads_them_or_says_how_to_make_them(tmp_path):
    from nnunet_cl.paths import NnUNetCLError, load_plans, save_json_atomic
    with pytest.raises(NnUNetCLError, match="nnUNetv2_plan_and_preprocess -d 7"):
        load_plans(str(tmp_path), "nnUNetPlans", 7)
    save_json_atomic({"plans_name": "nnUNetPlans", "configurations": {}}, tmp_path / "nnUNetPlans.json")
    plans_file, plans = load_plans(str(tmp_path), "nnUNetPlans", 7)
    assert plans_file == str(tmp_path / "nnUNetPlans.json") and plans["plans_name"] == "nnUNetPlans"
