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
