#!/usr/bin/env bash
# DCL-Seg robustness screen on MSD Hippocampus (docs/benchmarks.md "DCL-Seg"): nnUNetTrainer_clBenchQuick vs
# nnUNetTrainerDCLSeg_clBenchQuick, fold 0 = 40 labelled training cases (10 validation), the benchmark's plans
# (width 16, patch 40x56x40, batch 2); then nnUNetv2_cl_robustness on the 50 test cases. Resumable: each step
# skips what is done.
set -euo pipefail
# R: this screen's folder; SRC: a benchmark work folder whose Dataset950_Hippocampus (converted, with its
# nnUNetPlans_clBench plans) it copies; CODE: a snapshot of the project (git worktree) so that edits to the live
# checkout cannot reach a running job
R=${R:-/work/robust_bench}
SRC=${SRC:-/work/bench_screen_supercl}
CODE=${CODE:-/work/snap5}
export PYTHONPATH=$CODE nnUNet_extTrainer=$CODE/trainers/ext nnUNet_n_proc_DA=1
export nnUNet_raw=$R/nnUNet_raw nnUNet_preprocessed=$R/nnUNet_preprocessed nnUNet_results=$R/nnUNet_results
log() { echo "[$(date +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)] $*"; }
D=$nnUNet_raw/Dataset951_HippoRobust
if [ ! -f $D/dataset.json ]; then
  mkdir -p $D && cp -r $SRC/nnUNet_raw/Dataset950_Hippocampus/{imagesTr,labelsTr,imagesTs,labelsTs} $D/
  SRC=$SRC python - <<'PY'
import json, os
d = json.load(open(os.environ["SRC"] + "/nnUNet_raw/Dataset950_Hippocampus/dataset.json"))
json.dump(d, open(os.environ["nnUNet_raw"] + "/Dataset951_HippoRobust/dataset.json", "w"), indent=1)
PY
fi
P=$nnUNet_preprocessed/Dataset951_HippoRobust
if [ ! -d $P/nnUNetPlans_clBench_3d_fullres ]; then
  log "fingerprint + preprocess"
  nnUNetv2_extract_fingerprint -d 951 -np 1
  SRC=$SRC python - <<'PY'
import json, os
src = json.load(open(os.environ["SRC"] + "/nnUNet_preprocessed/Dataset950_Hippocampus/nnUNetPlans_clBench.json"))
src["dataset_name"] = "Dataset951_HippoRobust"
out = os.environ["nnUNet_preprocessed"] + "/Dataset951_HippoRobust"
json.dump(src, open(out + "/nnUNetPlans_clBench.json", "w"), indent=1)
import shutil; shutil.copy(os.environ["nnUNet_raw"] + "/Dataset951_HippoRobust/dataset.json", out + "/dataset.json")
cases = sorted(f[:-7] for f in os.listdir(os.environ["nnUNet_raw"] + "/Dataset951_HippoRobust/labelsTr"))
json.dump([{"train": cases[:40], "val": cases[40:50]}], open(out + "/splits_final.json", "w"), indent=1)
PY
  nnUNetv2_preprocess -d 951 -plans_name nnUNetPlans_clBench -c 3d_fullres -np 1
fi
for TR in nnUNetTrainer_clBenchQuick nnUNetTrainerDCLSeg_clBenchQuick; do
  F=$nnUNet_results/Dataset951_HippoRobust/${TR}__nnUNetPlans_clBench__3d_fullres/fold_0
  if [ ! -f $F/checkpoint_final.pth ]; then
    C=""; [ -f $F/checkpoint_latest.pth ] && C="--c"
    log "train $TR $C"; start=$(date +%s)
    nnUNetv2_train 951 3d_fullres 0 -tr $TR -p nnUNetPlans_clBench -device cpu $C > $R/train_$TR.log 2>&1
    log "  done in $(( $(date +%s) - start )) s"
  fi
done
log "robustness"; start=$(date +%s)
M=$nnUNet_results/Dataset951_HippoRobust
nnUNetv2_cl_robustness -i $D/imagesTs -l $D/labelsTs -o $R/robustness \
  -m nnUNet=$M/nnUNetTrainer_clBenchQuick__nnUNetPlans_clBench__3d_fullres \
     DCLSeg=$M/nnUNetTrainerDCLSeg_clBenchQuick__nnUNetPlans_clBench__3d_fullres > $R/robustness.log 2>&1
log "  done in $(( $(date +%s) - start )) s"
