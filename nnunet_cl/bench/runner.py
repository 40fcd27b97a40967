"""`nnUNetv2_cl_benchmark`: does contrastive pretraining beat nnU-Net from scratch with few labels?

One nnU-Net dataset is built under --work (its own nnUNet_raw, _preprocessed and _results; a user's folders
are never touched) from SOURCE, an MSD task folder or an nnU-Net raw dataset folder:

- a seeded held-out test set of --n_test cases goes to imagesTs/labelsTs: never planned, preprocessed,
  pretrained on or trained on; every other case is a training case;
- a fixed validation set of --n_val training cases, the same for every run and never in any training set;
- one splits_final.json where each (k, seed) is its own fold (k cases drawn with that seed, nested across k)
  and each seed has a ceiling fold (all non-validation training cases); the map is in benchmark_folds.json;
- each contrastive method pretrains once, on fold 0 (empty train and val): the pool is every preprocessed
  training image (validation images included; pretraining reads no label) plus --extra_unlabeled scans;
- every arm fine-tunes with the same trainer `nnUNetTrainer_<schedule>`: scratch without weights, a
  contrastive arm with `-pretrained_weights` of its pretraining, the ceiling on its ceiling fold;
- the test set is predicted with nnUNetv2_predict and scored with nnUNetv2_evaluate_folder.

Results: one JSON per run in --work/runs/<schedule> (a rerun skips those); in --work results_<schedule>.md/.csv
and three plots, dice_vs_labels_, dice_per_class_ and delta_vs_scratch_<schedule>.png (with --report_only
--report_as NAME, the same for a subset of the runs, named results_<schedule>_NAME.* and so on).
Everything the nnU-Net commands print goes to --work/benchmark_log.txt. See docs/benchmarks.md.
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_cl.bench.design import (BASE_PLANS, BENCH_PLANS, CEILING, CONFIG, DEFAULT_ARMS, FOLDS_FILE,
                                        PRETRAIN_FOLD, QUICK_ARMS, BenchmarkError, build_folds, complete_cases,
                                        needs_preprocessing, parse_arms, plan_runs, run_id, split_cases,
                                        splits_from_folds, write_bench_plans)
from nnunet_cl.ext_path import ext_trainer_path
from nnunet_cl.pool import POOL_RECORD
from nnunet_cl.paths import is_msd_dataset_json, save_json_atomic

DEFAULT_ID = 950
SCHEDULE, QUICK_SCHEDULE = "clBench", "clBenchQuick"
STATE_FILE, LOG_FILE, LOCK_FILE = "benchmark.json", "benchmark_log.txt", ".lock"
# settings that define the dataset and its splits: a rerun in the same --work must not change them
FIXED_SETTINGS = ("source", "labels_folder", "dataset_json", "dataset_id", "name", "n_test", "n_val", "split_seed",
                  "complete_cases", "plans_variant")
# the options behind FIXED_SETTINGS: without -i a rerun takes them from benchmark.json, and refuses other values
DATASET_OPTIONS = ("name", "dataset_id", "n_test", "n_val", "split_seed", "complete_cases", "labels_folder",
                   "dataset_json", "patch", "plan_network", "spacing_factor", "batch_size", "width")


def stored_option(settings: dict, dest: str):
    """The value of the command-line option `dest` that made `settings` (a benchmark.json's)."""
    variant = settings.get("plans_variant") or {}
    if dest in ("patch", "spacing_factor", "batch_size", "width"):
        return variant.get(dest)
    if dest == "plan_network":
        return variant.get("topology") == "planned"
    if dest == "complete_cases":
        return bool(settings.get("complete_cases"))
    return settings.get(dest)


def given_option(args, dest: str):
    value = getattr(args, dest)
    if dest == "dataset_json":
        return str(Path(value).resolve())
    return list(value) if dest == "patch" else value


class Bench:
    """One benchmark in one --work folder: dataset, plans, pool, pretrainings, fine-tuning runs, report."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.t0 = time.time()
        self.log = self.work / LOG_FILE
        self.schedule = args.schedule or (QUICK_SCHEDULE if args.quick else SCHEDULE)
        self.runs = self.work / "runs" / self.schedule  # a run of one schedule never counts for another
        # a fine-tuning variant may reuse another schedule's pretrainings (their checkpoints, not its runs)
        self.pretrain_schedule = args.pretrain_schedule or self.schedule
        self.failures: list[str] = []
        self.last_cpu = 0.0

    # ---------------------------------------------------------------- output
    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{_fmt(time.time() - self.t0)}] {msg}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def run(self, cmd: list[str], env: dict, what: str, show: str | None = None) -> tuple[float, str]:
        """Run one command, its output appended to the log; (seconds, output). Raises BenchmarkError on failure."""
        self.say(f"{what}: {show or ' '.join(cmd)}")
        t = time.time()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = []
        with open(self.log, "a", buffering=1) as f:  # line-buffered: the log follows a long pretraining live
            f.write(f"$ {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    encoding="utf-8", errors="replace")
            for line in proc.stdout:
                f.write(line)
                out.append(line)
            code = proc.wait()
        took = time.time() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the data-augmentation workers it joined
        self.last_cpu = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)
        if code != 0:
            tail = "".join(out[-25:])
            raise BenchmarkError(f"{what} failed (exit {code}) after {_fmt(took)}: {' '.join(cmd)}\n"
                                 f"--- last lines (all in {self.log}) ---\n{tail}")
        self.say(f"  {what} done in {_fmt(took)} (CPU {_fmt(self.last_cpu)}, load {os.getloadavg()[0]:.1f})")
        return took, "".join(out)

    # ---------------------------------------------------------------- environment
    def env(self, arm: str | None = None) -> dict:
        env = dict(os.environ)
        for name in ("nnUNet_raw", "nnUNet_preprocessed"):
            env[name] = str(self.work / name)
        # each arm has its own results root: all arms fine-tune the same trainer on the same folds
        env["nnUNet_results"] = str(self.results_root(arm))
        ext = [ext_trainer_path()] + [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        env["nnUNet_extTrainer"] = os.pathsep.join(dict.fromkeys(ext))
        env.setdefault("nnUNet_compile", "0")
        # one augmentation worker: on 2 cores no slower, and it makes a seeded run repeat exactly (paired arms)
        env.setdefault("nnUNet_n_proc_DA", "1")
        env.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net spawns 8 export/evaluation workers by default
        env["PYTHONUNBUFFERED"] = "1"  # the log follows the commands live
        # torch's OpenMP threads spin while waiting; on a CPU shared with other jobs that halves the speed
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return env

    def results_root(self, arm: str | None) -> Path:
        return self.work / "nnUNet_results" / (arm or "_none")

    # ---------------------------------------------------------------- state
    @property
    def dataset(self) -> str:
        return f"Dataset{self.settings['dataset_id']:03d}_{self.settings['name']}"

    @property
    def raw_dataset(self) -> Path:
        return self.work / "nnUNet_raw" / self.dataset

    @property
    def pre_dataset(self) -> Path:
        return self.work / "nnUNet_preprocessed" / self.dataset

    @property
    def plans(self) -> str:
        return BENCH_PLANS if self.settings.get("plans_variant") else BASE_PLANS

    def load_state(self) -> dict:
        f = self.work / STATE_FILE
        return json.loads(f.read_text()) if f.is_file() else {}

    def save_state(self) -> None:
        save_json_atomic(self.state, self.work / STATE_FILE)

    # ---------------------------------------------------------------- main flow
    def main(self) -> int:
        a = self.args
        self.work.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        with _Lock(self.work / LOCK_FILE):
            self.state = self.load_state()
            if a.report_as and not a.report_only:
                raise BenchmarkError("--report_as only names a table of finished runs. Fix: add --report_only.")
            if a.report_only:
                if self.state.get("settings"):
                    self.check_given_options(self.state["settings"])
                return self.report(final=True, name=a.report_as)
            self.settings = self.resolve_settings()
            self.say(f"nnUNetv2_cl_benchmark in {self.work} (all command output: {self.log})")
            arms = parse_arms(a.arms or (QUICK_ARMS if a.quick else DEFAULT_ARMS))
            self.check_trainers(arms)  # before any long step: a missing fine-tuning trainer stops here
            self.prepare_dataset()
            self.preprocess()
            self.ingest_unlabeled()
            folds = self.write_splits()
            ks = [a.k[0]] if a.quick else a.k
            seeds = [a.seeds[0]] if a.quick else a.seeds
            ceiling_seeds = seeds[:a.ceiling_seeds]
            plan = plan_runs(folds, arms, ks, seeds, ceiling_seeds)
            skipped = self.state["skipped"]
            done = [p for p in plan if (self.runs / f"{run_id(p[0], p[2])}.json").is_file()]
            todo = [p for p in plan if p not in done and p[0] not in skipped]
            with_ceiling = ceiling_seeds if any(x == CEILING for x, _ in arms) else []
            self.say(f"Schedule {self.schedule}: {len(plan)} runs planned ({len(arms)} arms, k={ks}, seeds={seeds}, "
                     f"ceiling seeds={with_ceiling}): {len(done)} finished before, "
                     f"{len(plan) - len(done) - len(todo)} of skipped arms, {len(todo)} to do")
            pretrained: dict[str, str | None] = {}
            for i, (arm, pre, fold) in enumerate(todo, 1):
                rid = run_id(arm, fold)
                try:
                    weights = None
                    if pre is not None:
                        if arm not in pretrained:
                            pretrained[arm] = self.pretrain(arm, pre)
                        weights = pretrained[arm]
                        if weights is None:
                            continue
                    self.say(f"[{i}/{len(todo)}] {rid} (fold {fold['fold']}, {len(fold['train'])} labeled cases)")
                    self.finetune_predict_score(arm, pre, fold, weights)
                except BenchmarkError as e:
                    self.failures.append(f"{rid}: {str(e).splitlines()[0]}")
                    self.say(f"FAILED {rid}: {e}")
                self.report(final=False)
            return self.report(final=True)

    def resolve_settings(self) -> dict:
        a = self.args
        old = self.state.get("settings")
        if a.source is None:
            if not old:
                raise BenchmarkError(f"{self.work} holds no benchmark yet. Fix: give the dataset with -i SOURCE.")
            self.check_given_options(old)
            settings = dict(old)
        else:
            source = Path(a.source).resolve()
            if not (source / "dataset.json").is_file() and not a.dataset_json:
                raise BenchmarkError(f"{source} has no dataset.json: give an MSD task folder or an nnU-Net raw "
                                     f"dataset folder (imagesTr, {a.labels_folder}, dataset.json).")
            if a.plan_network and not a.patch:
                raise BenchmarkError("--plan_network plans the network for a patch. Fix: give --patch too.")
            dj_file = Path(a.dataset_json).resolve() if a.dataset_json else source / "dataset.json"
            name = a.name or re.sub(r"[^A-Za-z0-9]", "", str(json.loads(dj_file.read_text()).get("name", ""))) \
                or re.sub(r"[^A-Za-z0-9]", "", source.name) or "Bench"
            settings = {"source": str(source), "labels_folder": a.labels_folder, "dataset_json": str(dj_file),
                        "dataset_id": int(a.dataset_id), "name": name, "n_test": int(a.n_test),
                        "n_val": int(a.n_val), "split_seed": int(a.split_seed),
                        "complete_cases": True if a.complete_cases else None,
                        "plans_variant": {k: v for k, v in (("patch", a.patch), ("batch_size", a.batch_size),
                                                            ("width", a.width),
                                                            ("topology", "planned" if a.plan_network else None),
                                                            ("spacing_factor", a.spacing_factor))
                                           if v is not None} or None}
            if old:
                changed = [k for k in FIXED_SETTINGS if old.get(k) != settings.get(k)]
                if changed:
                    diff = ", ".join(f"{k}: {old.get(k)} -> {settings.get(k)}" for k in changed)
                    raise BenchmarkError(
                        f"{self.work} was made with other settings ({diff}). These define the test set and the "
                        f"splits. Fix: rerun with the same values, or use a new --work.")
        self.state["settings"] = settings
        self.state.setdefault("stages", {})
        self.save_state()
        return settings

    def check_given_options(self, old: dict) -> None:
        """Without -i, dataset options given on the command line must match benchmark.json's."""
        a = self.args
        changed = [d for d in getattr(a, "given_dataset_options", ()) if given_option(a, d) != stored_option(old, d)]
        if changed:
            diff = ", ".join(f"--{d}: {stored_option(old, d)} -> {given_option(a, d)}" for d in changed)
            raise BenchmarkError(
                f"{self.work} was made with other settings ({diff}). Without -i a rerun uses the ones in "
                f"benchmark.json, which define the test set and the splits. Fix: leave these options out, or use "
                f"a new --work with -i.")

    # ---------------------------------------------------------------- dataset
    def prepare_dataset(self) -> None:
        if self.state["stages"].get("dataset"):
            return
        s = self.settings
        src, env = Path(s["source"]), self.env()
        shutil.rmtree(self.raw_dataset, ignore_errors=True)  # a half-made copy from an interrupted run
        staging = self.work / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        dj = json.loads(Path(s["dataset_json"]).read_text())
        if is_msd_dataset_json(dj):  # let nnU-Net convert it first
            staging.mkdir(parents=True)
            self.run(["nnUNetv2_convert_MSD_dataset", "-i", str(src), "-np", "1", "-overwrite_id",
                      str(s["dataset_id"])], {**env, "nnUNet_raw": str(staging)}, "convert MSD")
            src = next(staging.glob(f"Dataset{s['dataset_id']:03d}_*"))
            dj = json.loads((src / "dataset.json").read_text())
            labels_dir = src / "labelsTr"
        else:
            labels_dir = src / s["labels_folder"]
        ending = dj["file_ending"]
        channels = len(dj["channel_names"])
        if not labels_dir.is_dir():
            raise BenchmarkError(f"{labels_dir} does not exist. Fix: --labels_folder names the label folder.")
        cases = sorted(p.name[:-len(ending)] for p in labels_dir.iterdir() if p.name.endswith(ending))
        missing = [c for c in cases if not all((src / "imagesTr" / f"{c}_{ch:04d}{ending}").is_file()
                                               for ch in range(channels))]
        if missing:
            raise BenchmarkError(f"{len(missing)} labeled case(s) without all {channels} image channel(s) in "
                                 f"{src / 'imagesTr'}, e.g. {missing[:3]}")
        complete = None
        if s.get("complete_cases"):
            complete = self.complete_cases(labels_dir, cases, ending, dj["labels"])
        split = split_cases(cases, s["n_test"], s["n_val"], s["split_seed"], complete)
        out = self.raw_dataset
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / sub).mkdir(parents=True)
        for group, img_dir, lab_dir in ((split["train"] + split["val"], "imagesTr", "labelsTr"),
                                        (split["test"], "imagesTs", "labelsTs")):
            for c in group:
                for ch in range(channels):
                    shutil.copy(src / "imagesTr" / f"{c}_{ch:04d}{ending}", out / img_dir)
                shutil.copy(labels_dir / f"{c}{ending}", out / lab_dir / f"{c}{ending}")
        for key in ("dataset", "training", "test", "numTest"):  # explicit file lists would point elsewhere
            dj.pop(key, None)
        dj["numTraining"] = len(split["train"]) + len(split["val"])
        (out / "dataset.json").write_text(json.dumps(dj, indent=1))
        shutil.rmtree(staging, ignore_errors=True)
        self.state["split"] = split
        self.state["labels"] = {str(v): k for k, v in dj["labels"].items() if not isinstance(v, list)}
        self.state["stages"]["dataset"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save_state()
        self.say(f"Dataset {out}: {len(split['train']) + len(split['val'])} training cases "
                 f"({len(split['val'])} of them validation), {len(split['test'])} held-out test cases")

    def preprocess(self) -> None:
        s = self.settings
        resample = needs_preprocessing(s.get("plans_variant"))
        if not self.state["stages"].get("preprocess"):
            # with a coarser spacing only the bench plans' data is used: plan here, preprocess below
            took, _ = self.run(["nnUNetv2_plan_and_preprocess", "-d", str(s["dataset_id"]), "-c", CONFIG, "-np", "2"]
                               + (["--no_pp"] if resample else []), self.env(), "plan and preprocess")
            self.state["stages"]["preprocess"] = round(took, 1)
            self.save_state()
        if s.get("plans_variant") and not (self.pre_dataset / f"{BENCH_PLANS}.json").is_file():
            cfg = write_bench_plans(self.pre_dataset, **s["plans_variant"])
            self.say(f"Plans {BENCH_PLANS} for every arm: {CONFIG} spacing {[round(x, 2) for x in cfg['spacing']]}, "
                     f"patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
                     f"features {cfg['architecture']['arch_kwargs']['features_per_stage']}")
        if resample and not self.state["stages"].get("preprocess_bench_plans"):
            took, _ = self.run(["nnUNetv2_preprocess", "-d", str(s["dataset_id"]), "-plans_name", BENCH_PLANS, "-c",
                                CONFIG, "-np", "2"], self.env(), f"preprocess for {BENCH_PLANS}")
            self.state["stages"]["preprocess_bench_plans"] = round(took, 1)
            self.save_state()

    def ingest_unlabeled(self) -> None:
        done = self.state["stages"].setdefault("unlabeled", {})
        for folder in self.args.extra_unlabeled or []:
            folder = str(Path(folder).resolve())
            if folder in done:
                continue
            if self.state.get("pretrained"):
                self.say(f"NOTE: {folder} joins the pool after some pretraining ran "
                         f"({', '.join(self.state['pretrained'])}); those keep their smaller pool until deleted")
            took, _ = self.run(["nnUNetv2_cl_add_unlabeled", "-d", str(self.settings["dataset_id"]), "-i", folder,
                                "-p", self.plans, "-c", CONFIG, "-np", "2"], self.env(), "add unlabeled")
            done[folder] = round(took, 1)
            self.save_state()

    def complete_cases(self, labels_dir: Path, cases: list[str], ending: str, labels: dict) -> list[str]:
        complete = complete_cases(labels_dir, cases, ending, labels)
        self.say(f"--complete_cases: {len(complete)} of {len(cases)} cases hold every class; the test set and the k "
                 f"labeled cases come from them, the ceiling and the pool use every case")
        return complete

    def write_splits(self) -> list[dict]:
        a, split = self.args, self.state["split"]
        folds_file = self.work / FOLDS_FILE
        existing = json.loads(folds_file.read_text())["folds"] if folds_file.is_file() else []
        folds = build_folds(split["train"], split["val"], a.k, a.seeds, existing, split.get("labeled"))
        splits = splits_from_folds(folds)
        splits_file = self.pre_dataset / "splits_final.json"
        if not splits_file.is_file() or json.loads(splits_file.read_text()) != splits:
            save_json_atomic(splits, splits_file)
        save_json_atomic({"dataset": self.dataset, "test": split["test"], "val": split["val"],
                    "train_candidates": split["train"], "pretrain_fold": PRETRAIN_FOLD,
                    "note": f"fold i of splits_final.json is folds[i]. Pretraining runs on fold {PRETRAIN_FOLD} (empty "
                            "train and val): its pool is every preprocessed training image, validation included, plus "
                            "the ingested scans, and no label. Test cases are in imagesTs only, never preprocessed.",
                    "folds": folds}, folds_file)
        return folds

    def check_trainers(self, arms) -> None:
        """Which trainers nnU-Net finds; arms whose pretraining schedule class is missing are skipped, with why."""
        suffix, pre_suffix = f"_{self.schedule}", f"_{self.pretrain_schedule}"
        names = [f"nnUNetTrainer{suffix}"] + [f"{p}{pre_suffix}" for _, p in arms if p]
        code = ("import json, os, sys\n"
                "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
                "out = {}\n"
                "for n in sys.argv[1:]:\n"
                "    try:\n"
                "        find(n); out[n] = None\n"
                "    except Exception as e:  # an import error in a trainer module lands here too: keep its text\n"
                "        out[n] = '%s: %s (nnUNet_extTrainer=%s)' % (type(e).__name__, ' '.join(str(e).split())[:300], "
                "os.environ.get('nnUNet_extTrainer'))\n"
                "print('@@TRAINERS ' + json.dumps(out))\n")
        _, out = self.run([sys.executable, "-c", code, *names], self.env(), "look up trainers",
                          show=f"recursive_find_trainer_class_by_name {' '.join(names)}")
        found = json.loads(out.split("@@TRAINERS ", 1)[1].splitlines()[0])
        if found[names[0]] is not None:
            raise BenchmarkError(f"the fine-tuning trainer {names[0]} is not found: {found[names[0]]}. Fix: if the "
                                 f"text names an import error, mend that module (`python -c 'import "
                                 f"nnunet_cl_trainers'` shows it); for a schedule of your own, define "
                                 f"{names[0]} in a .py file of a folder of yours and add that folder to "
                                 f"nnUNet_extTrainer (separated by '{os.pathsep}'; the benchmark adds its own).")
        skipped = {}
        for arm, pre in arms:
            if pre and found[f"{pre}{pre_suffix}"] is not None:
                skipped[arm] = f"{pre}{pre_suffix}: {found[f'{pre}{pre_suffix}']}"
                self.say(f"SKIPPED arm {arm}: {skipped[arm]}")
        self.state["skipped"] = skipped  # recomputed every invocation: an arm whose trainer landed runs next time
        self.save_state()

    # ---------------------------------------------------------------- runs
    def pretrain(self, arm: str, pretrainer: str) -> str | None:
        """Pretrain once per arm on the pretraining fold; the path of its checkpoint_final.pth (None if it failed)."""
        trainer = f"{pretrainer}_{self.pretrain_schedule}"
        record_file = self.runs / f"pretrain__{arm}.json"
        folder = self.results_root(arm) / self.dataset / f"{trainer}__{self.plans}__{CONFIG}" / f"fold_{PRETRAIN_FOLD}"
        ckpt = folder / "checkpoint_final.pth"
        if record_file.is_file() and ckpt.is_file():
            return str(ckpt)
        try:
            resumed = (folder / "checkpoint_latest.pth").is_file() and not ckpt.is_file()
            took, out = 0.0, ""
            if not ckpt.is_file():
                cmd = ["nnUNetv2_train", str(self.settings["dataset_id"]), CONFIG, str(PRETRAIN_FOLD), "-tr", trainer,
                       "-p", self.plans, "-device", "cpu"] + (["--c"] if resumed else [])
                took, out = self.run(cmd, self.env(arm), f"pretrain {arm}")
        except BenchmarkError as e:
            self.failures.append(f"pretrain {arm}: {str(e).splitlines()[0]}")
            self.say(f"FAILED pretraining of {arm}; its runs are left out. {e}")
            return None
        pool = _pool_cases(folder)
        # wall time only when this invocation ran all of it; otherwise the report uses nnU-Net's epoch times
        save_json_atomic({"arm": arm, "trainer": trainer, "checkpoint": str(ckpt),
                    "wall_s": round(took, 1) if took and not resumed else None,
                    "cpu_s": self.last_cpu if took else None,
                    "epochs_s": _epoch_seconds(ckpt), "pool_cases": pool,
                    "resumed": resumed, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, record_file)
        self.state.setdefault("pretrained", {})[arm] = str(ckpt)
        self.save_state()
        return str(ckpt)

    def finetune_predict_score(self, arm: str, pretrainer: str | None, fold: dict, weights: str | None) -> None:
        s, rid = self.settings, run_id(arm, fold)
        trainer = f"nnUNetTrainer_{self.schedule}"
        env = self.env(arm)
        model = self.results_root(arm) / self.dataset / f"{trainer}__{self.plans}__{CONFIG}"
        fold_dir = model / f"fold_{fold['fold']}"
        partial_file = self.runs / "training" / f"{rid}.json"  # kept: a rerun may need the training time again
        partial = json.loads(partial_file.read_text()) if partial_file.is_file() else {}
        if not (fold_dir / "checkpoint_final.pth").is_file():
            cmd = ["nnUNetv2_train", str(s["dataset_id"]), CONFIG, str(fold["fold"]), "-tr", trainer, "-p", self.plans,
                   "-device", "cpu"]
            resumed = (fold_dir / "checkpoint_latest.pth").is_file()
            if resumed:
                cmd.append("--c")  # nnU-Net refuses --c together with -pretrained_weights; the checkpoint has them
            elif weights:
                cmd += ["-pretrained_weights", weights]
            took, out = self.run(cmd, env, f"fine-tune {rid}")
            if weights and not resumed and "Loading pretrained weights from file" not in out:
                raise BenchmarkError(f"{rid}: nnU-Net did not report loading {weights}")
            partial = {"finetune_wall_s": round(took, 1), "finetune_cpu_s": self.last_cpu, "resumed": resumed}
            save_json_atomic(partial, partial_file)
        pred = self.work / "predictions" / self.schedule / arm / rid
        shutil.rmtree(pred, ignore_errors=True)  # a prediction is cheap; never score a half-written one
        cmd = ["nnUNetv2_predict", "-i", str(self.raw_dataset / "imagesTs"), "-o", str(pred), "-d",
               str(s["dataset_id"]), "-p", self.plans, "-c", CONFIG, "-tr", trainer, "-f", str(fold["fold"]),
               "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        if not self.args.tta:
            cmd.append("--disable_tta")
        if self.args.step_size is not None:
            cmd += ["-step_size", str(self.args.step_size)]
        t_pred, _ = self.run(cmd, env, f"predict {rid}")
        cpu_pred = self.last_cpu
        t_eval, _ = self.run(["nnUNetv2_evaluate_folder", str(self.raw_dataset / "labelsTs"), str(pred), "-djfile",
                              str(self.raw_dataset / "dataset.json"), "-pfile", str(model / "plans.json"), "-np", "1"],
                             env, f"evaluate {rid}")
        summary = json.loads((pred / "summary.json").read_text())
        n_scored = len(summary["metric_per_case"])
        if n_scored != len(self.state["split"]["test"]):
            raise BenchmarkError(f"{rid}: {n_scored} test cases scored, expected {len(self.state['split']['test'])}")
        pre_record = self.runs / f"pretrain__{arm}.json"
        record = {
            "arm": arm, "kind": fold["kind"], "k": fold["k"], "seed": fold["seed"], "fold": fold["fold"],
            "train_cases": fold["train"], "n_val": len(fold["val"]), "n_test": n_scored,
            "finetune_trainer": trainer, "plans": self.plans, "pretrain_trainer":
                f"{pretrainer}_{self.pretrain_schedule}" if pretrainer else None, "pretrained_weights": weights,
            "schedule": self.schedule,
            "tta": bool(self.args.tta), "step_size": self.args.step_size or 0.5,
            "dice": {c: _num(v["Dice"]) for c, v in summary["mean"].items() if str(c) != "0"},
            "mean_fg_dice": _num(summary["foreground_mean"]["Dice"]),
            "labels": self.state.get("labels", {}),
            "wall_s": {"pretrain": json.loads(pre_record.read_text())["wall_s"] if pretrainer and pre_record.is_file()
                       else None, "finetune": partial.get("finetune_wall_s"), "predict": round(t_pred, 1),
                       "evaluate": round(t_eval, 1)},
            "cpu_s": {"finetune": partial.get("finetune_cpu_s"), "predict": cpu_pred, "evaluate": self.last_cpu},
            "finetune_epochs_s": _epoch_seconds(fold_dir / "checkpoint_final.pth"),
            "resumed": partial.get("resumed", False), "summary_json": str(pred / "summary.json"),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        save_json_atomic(record, self.runs / f"{rid}.json")
        names = record["labels"]
        per_class = ", ".join(f"{names.get(c, c)} {v:.3f}" for c, v in record["dice"].items() if v is not None)
        mean = record["mean_fg_dice"]
        self.say(f"  {rid}: mean foreground Dice {'n/a' if mean is None else f'{mean:.4f}'} ({per_class})")

    def report(self, final: bool, name: str | None = None) -> int:
        """The table and plots of every finished run; with a name, of the runs of --arms, --k and --seeds only,
        as results_<schedule>_<name>.*"""
        from nnunet_cl.bench.report import run_filter, write_report
        a, skipped = self.args, self.state.get("skipped", {})
        settings = self.state.get("settings", {})
        title = f"{settings.get('name', 'benchmark')}, schedule {self.schedule}: " \
                f"{settings.get('n_test', '?')} held-out test cases"
        select, suffix = None, f"_{self.schedule}"
        if name:
            arms = [arm for arm, _ in parse_arms(a.arms or DEFAULT_ARMS)]
            select, suffix = run_filter(arms, a.k, a.seeds), f"{suffix}_{name}"
            skipped = {arm: why for arm, why in skipped.items() if arm in arms}
            title += f"; arms {', '.join(arms)}; k = {', '.join(map(str, a.k))}; seeds {', '.join(map(str, a.seeds))}"
        paths = write_report(self.runs, self.work, skipped=skipped, suffix=suffix, title=title, select=select)
        if final:
            if paths:
                plots = ", ".join(paths[k] for k in ("png", "png_per_class", "png_deltas") if k in paths)
                self.say(f"Table: {paths['md']} and {paths['csv']}; plots: {plots}")
                print("\n" + Path(paths["md"]).read_text(), flush=True)
            else:
                self.say("No finished run yet: no table")
            if self.failures:
                self.say(f"{len(self.failures)} failure(s) (rerun the same command to retry them):")
                for f in self.failures:
                    self.say(f"  {f}")
            self.say("finished" if not self.failures else "finished with failures")
        return 1 if self.failures else 0


# ------------------------------------------------------------------------------------------------------------
# helpers

def _pool_cases(fold_folder: Path) -> int | None:
    """The number of pool cases a pretraining read, from the record its trainer wrote (None: no record)."""
    try:
        return int(json.loads((Path(fold_folder) / POOL_RECORD).read_text())["cases"])
    except (OSError, ValueError, KeyError):
        return None


def _epoch_seconds(checkpoint: Path) -> float | None:
    """Sum of nnU-Net's logged epoch times (end - start) in a checkpoint: training only, no start-up/validation."""
    try:
        from nnunet_cl.safe_load import load_checkpoint_file
        log = load_checkpoint_file(str(checkpoint))["logging"]
        s, e = log["epoch_start_timestamps"], log["epoch_end_timestamps"]
        return round(float(sum(b - a for a, b in zip(s, e))), 1)
    except Exception:  # noqa: BLE001 - a missing number, not a reason to stop
        return None


def _num(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(v) else v


def _step_size(text: str) -> float:
    """argparse type of --step_size: nnU-Net's sliding-window step, a fraction of the patch in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: the step is a fraction of the patch, in (0, 1] (nnU-Net's default "
                                         f"is 0.5)")
    return value


def _table_name(text: str) -> str:
    """argparse type of --report_as: a name that is safe as part of a file name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: the table's name becomes part of its file names; use letters, "
                                         f"digits, '_', '.' and '-' (e.g. main_3seeds)")
    return text


def _ceiling_seeds(text: str) -> int:
    """argparse type of --ceiling_seeds: at least 1 (leave `ceiling` out of --arms for none)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: the ceiling runs for at least the first seed; to run no ceiling, "
                                         f"leave it out of --arms (e.g. --arms scratch simclr)")
    return value


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Lock:
    """One benchmark process per work folder: a second one would train into the same fold folders."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if self.path.is_file():
            try:
                pid = int(self.path.read_text().strip())
                os.kill(pid, 0)
                alive = pid != os.getpid()
            except (ValueError, ProcessLookupError):
                alive = False
            except PermissionError:
                alive = True
            if alive:
                raise BenchmarkError(f"another nnUNetv2_cl_benchmark (pid {pid}) works in {self.path.parent}. "
                                     f"Fix: wait for it, or remove {self.path} if that process is gone.")
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_cl_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", dest="source", default=None,
                   help="MSD task folder or nnU-Net raw dataset folder (imagesTr, labels folder, dataset.json); "
                        "may be left out when --work already holds a benchmark")
    p.add_argument("--work", required=True, help="working folder; rerun with the same folder to resume")
    p.add_argument("--name", default=None, help="dataset name (default: from dataset.json)")
    p.add_argument("--dataset_id", type=int, default=DEFAULT_ID, help=f"id inside --work (default {DEFAULT_ID})")
    p.add_argument("--k", type=int, nargs="+", default=[2, 5, 10], help="labeled cases per run (default 2 5 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="draws of the k cases (default 0: one seed fits 3 h; add seeds later, e.g. 0 1 2)")
    p.add_argument("--arms", nargs="+", default=None,
                   help=f"default: {' '.join(DEFAULT_ARMS)} ({' '.join(QUICK_ARMS)} with --quick); "
                        f"NAME=nnUNetTrainerXPretrain adds a method of yours")
    p.add_argument("--n_test", type=int, default=50, help="held-out test cases (default 50)")
    p.add_argument("--n_val", type=int, default=10, help="fixed validation cases (default 10)")
    p.add_argument("--split_seed", type=int, default=12345, help="seed of the test/validation draw (default 12345)")
    p.add_argument("--complete_cases", action="store_true",
                   help="draw the test set and the k labeled cases only from cases whose label map holds every "
                        "class (for partially contoured datasets such as OpenKBP, where an organ not contoured is "
                        "background)")
    p.add_argument("--extra_unlabeled", nargs="+", default=None, help="folders of unlabeled scans for the pool")
    p.add_argument("--labels_folder", default="labelsTr", help="label folder of SOURCE (default labelsTr)")
    p.add_argument("--dataset_json", default=None, help="dataset.json to use (default SOURCE/dataset.json)")
    p.add_argument("--quick", action="store_true",
                   help=f"only the first --k and the first --seeds, no ceiling unless --arms names it, with the short "
                        f"schedule {QUICK_SCHEDULE}")
    p.add_argument("--patch", type=int, nargs=3, default=None,
                   help="3d_fullres patch size for every arm (plans variant nnUNetPlans_clBench, same data)")
    p.add_argument("--plan_network", action="store_true",
                   help="with --patch: plan the network's stages for that patch as nnU-Net's planner would (e.g. 4 "
                        "stages for 32x64x32), instead of keeping the plans' stages")
    p.add_argument("--spacing_factor", type=float, default=None,
                   help="resample every image to the plans' spacing times this factor (e.g. 2: half the resolution "
                        "per axis, as nnU-Net's 3d_lowres), so a small patch holds more anatomy; predictions are "
                        "scored at each image's own spacing (plans variant, preprocessed once)")
    p.add_argument("--batch_size", type=int, default=None, help="fine-tuning batch size for every arm (plans variant)")
    p.add_argument("--width", type=int, default=None,
                   help="features of the network's first stage, all stages scaled alike, for every arm (plans variant)")
    p.add_argument("--schedule", default=None,
                   help=f"trainer suffix: nnUNetTrainer_<schedule> and <pretrainer>_<schedule> (default {SCHEDULE}; "
                        f"{QUICK_SCHEDULE} with --quick)")
    p.add_argument("--pretrain_schedule", default=None,
                   help="pretrain with <pretrainer>_<this> instead of <pretrainer>_<schedule>: a fine-tuning variant "
                        "(e.g. --schedule clBenchFT --pretrain_schedule clBench) reuses that schedule's pretrainings")
    p.add_argument("--ceiling_seeds", type=_ceiling_seeds, default=1,
                   help="run the ceiling for the first N seeds (default 1: its training cases do not depend on it)")
    p.add_argument("--tta", action="store_true", help="predict with nnU-Net's mirroring (default off, 8x cheaper)")
    p.add_argument("--step_size", type=_step_size, default=None,
                   help="sliding-window step of nnUNetv2_predict as a fraction of the patch (nnU-Net's default 0.5; "
                        "1: no overlap, e.g. 8 windows instead of 27 for a 128^3 volume and a 64^3 patch)")
    p.add_argument("--report_only", action="store_true", help="only rewrite the table and plot from --work/runs")
    p.add_argument("--report_as", type=_table_name, default=None, metavar="NAME",
                   help="with --report_only: a table and plots of only the runs of --arms, --k and --seeds (their "
                        "defaults apply), as results_<schedule>_NAME.md/.csv and its PNGs, e.g. the default arms apart "
                        "from extra arms run in the same work folder")
    args = p.parse_args(argv)
    args.given_dataset_options = tuple(d for d in DATASET_OPTIONS if getattr(args, d) != p.get_default(d))
    try:
        code = Bench(args).main()
    except BenchmarkError as e:
        raise SystemExit(f"nnUNetv2_cl_benchmark: error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("nnUNetv2_cl_benchmark: interrupted; rerun the same command to resume")
    sys.exit(code)


if __name__ == "__main__":
    main()
