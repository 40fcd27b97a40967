"""The README's main job at reduced size: `nnUNetv2_cl_demo --quick` end to end through nnU-Net's commands."""
import subprocess



def test_demo_quick_prints_a_dice_table(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run(["nnUNetv2_cl_demo", "--quick", "--work", str(work)], capture_output=True, text=True,
        encoding="utf-8", errors="replace",
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (work / "dice_table.md").read_text().splitlines()
    assert table[0].startswith("| arm |") and "mean foreground" in table[0]
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == {"scratch (nnUNetTrainer)", "SimCLR pretrained"}
    for line in rows.values():
        values = [float(v) for v in line.strip("|").split("|")[1:]]
        assert len(values) == 5 and all(0.0 <= v <= 1.0 for v in values)  # 4 organ classes + mean
    assert "synthetic phantoms" in proc.stdout
    # both arms predicted every held-out case with nnUNetv2_predict
    for trainer in ("nnUNetTrainer_clDemoQuick", "nnUNetTrainerSimCLR_clDemoQuick"):
        assert len(list((work / "predictions" / trainer).glob("*.nii.gz"))) == 3


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
