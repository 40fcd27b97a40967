"""The README's main job at reduced size: `nnUNetv2_cl_demo --quick` end to end through nnU-Net's commands."""
import subprocess


def _demo(work, cwd, seed):
    proc = subprocess.run(["nnUNetv2_cl_demo", "--quick", "--work", str(work), "--seed", str(seed)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1500, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_demo_quick_prints_a_dice_table_and_repeats_it_for_the_same_seed(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    work = tmp_path / "demo"
    proc = _demo(work, cwd, seed=3)
    table = (work / "dice_table.md").read_text().splitlines()
    assert table[0].startswith("| arm |") and "mean foreground" in table[0]
    rows = {line.split("|")[1].strip(): line for line in table[2:4]}
    assert set(rows) == {"scratch (nnUNetTrainer)", "SimCLR pretrained"}
    for line in rows.values():
        values = [float(v) for v in line.strip("|").split("|")[1:]]
        assert len(values) == 5 and all(0.0 <= v <= 1.0 for v in values)  # 4 organ classes + mean
    assert "synthetic phantoms" in proc.stdout and "training seed 3" in proc.stdout
    # both arms predicted every held-out case with nnUNetv2_predict
    for trainer in ("nnUNetTrainer_clDemoQuick", "nnUNetTrainerSimCLR_clDemoQuick"):
        assert len(list((work / "predictions" / trainer).glob("*.nii.gz"))) == 3
    # one console line per epoch while training: 2 epochs of scratch, 2 + 2 of SimCLR
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("  epoch ")]
    assert len(epochs) == 6 and all("train_loss" in e and e.endswith(" s") and "np.float" not in e for e in epochs)
    assert sum("contrastive" in e for e in epochs) == 2
    # the way on: the exact folders of this run, then train, predict and export lines
    assert f"export nnUNet_raw={work / 'nnUNet_raw'} nnUNet_preprocessed={work / 'nnUNet_preprocessed'}" in proc.stdout
    assert "nnUNet_extTrainer=" in proc.stdout
    for command in ("nnUNetv2_train 991 3d_fullres 0 -tr", "nnUNetv2_predict -i", "nnUNetv2_cl_export -d 991"):
        assert f"  {command}" in proc.stdout
    assert not any(cwd.iterdir())  # everything went under --work
    # the same seed again: the same table
    _demo(tmp_path / "again", cwd, seed=3)
    assert (tmp_path / "again" / "dice_table.md").read_text() == (work / "dice_table.md").read_text()


def test_unlearned_structures_are_the_classes_at_zero_in_every_arm():
    from nnunet_cl.demo import unlearned_structures

    def arm(*dice):
        return {"mean": {str(i + 1): {"Dice": d} for i, d in enumerate(dice)}}
    scores = {"scratch": arm(0.9, 0.0, 0.0, 0.0002), "pretrained": arm(0.8, 0.1, 0.0, 0.002)}
    assert unlearned_structures(scores, {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "tumour": 4}) == \
        ["spleen"]


def test_demo_refuses_a_non_empty_work_folder(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    proc = subprocess.run(["nnUNetv2_cl_demo", "--work", str(tmp_path)], capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_real_dataset_copies_every_channel_of_the_pool_cases(tmp_path):
    """--dataset with a 2-channel dataset: each pool case keeps both channels, which add_unlabeled groups again."""
    import json

    from nnunet_cl.demo import _real_dataset
    from nnunet_cl.image_io import find_sources

    src = tmp_path / "Dataset123_Two"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    cases = [f"case{i:02d}" for i in range(7)]
    for c in cases:
        for ch in (0, 1):
            (src / "imagesTr" / f"{c}_{ch:04d}.nii.gz").write_bytes(b"")  # copied, never read here
        (src / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "labels": {
        "background": 0, "organ": 1}, "numTraining": 7, "file_ending": ".nii.gz"}))
    out, pool = _real_dataset(src, tmp_path / "raw", {}, tmp_path / "log.txt", n_labeled=2, n_test=2, n_pool=3)
    assert len(list((out / "imagesTr").iterdir())) == 4 and len(list((out / "labelsTr").iterdir())) == 2
    sources, _ = find_sources(str(pool), num_channels=2)
    assert sorted(s["stem"] for s in sources) == cases[4:] and all(len(s["files"]) == 2 for s in sources)
    assert not any(p.name.startswith(tuple(cases[4:])) for p in (out / "labelsTr").iterdir())
