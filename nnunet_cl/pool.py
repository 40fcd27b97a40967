"""The unlabeled pool: extra scans preprocessed with the labeled dataset's own plans, for self-supervised stages.

`nnUNetv2_cl_add_unlabeled -d DATASET -i FOLDER` reads NIfTI, NRRD, MHA/MHD files and DICOM series, runs them
through the preprocessor named in the dataset's plans (`DefaultPreprocessor.run_case_npy`: transpose, crop to
nonzero, normalise with the dataset's intensity statistics, resample to the target spacing) and stores them
like nnU-Net stores preprocessed cases::

    nnUNet_preprocessed/DatasetXXX_Name/nnunet_cl_pool/
        pool.json                      {case_id: {"source", "shape", "spacing", ...}}
        <data_identifier>/<case>.b2nd, <case>_seg.b2nd, <case>.pkl

In pool.json, "source" is the absolute path of the file or DICOM folder, "shape" and "spacing" are the source
image's (z, y, x, nnU-Net's properties['spacing']), and "preprocessed" maps each data identifier to the
stored shape and target spacing (in the plans' transposed axis order). Case ids are `pool_<file stem>`,
sanitised and made unique; a source is recognised on re-runs by its absolute path.

Pool cases carry no labels: their seg is the nonzero mask crop_to_nonzero makes without a segmentation
(-1 outside, 0 inside) and properties['class_locations'] is {}.

The pretraining pool (`list_pool`) is the labeled dataset's own images minus the validation cases of the
fold being trained, plus every ingested case. Self-supervised stages never read labels: the pretraining
loader loads only the image ('data') of each case and ignores seg, so training images whose labels are
withheld by a limited split (nnunet_cl.splits) are used as unlabeled images only.
"""
import argparse
import copy
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from os.path import basename, isdir, isfile, join

import numpy as np
from tqdm import tqdm

from nnunet_cl.image_io import check_volume, find_sources, read_source
from nnunet_cl.paths import NnUNetCLError, dataset_name, load_plans, require_env, save_json_atomic
from nnunet_cl.pool_store import CASE_ENDINGS, broken_cases, remove_temporaries, save_case_atomic, source_from_entry
from nnunet_cl.scan_checks import (ScanLimits, check_file, check_geometry, dicom_modality, modality_warning,
                                   resampled_size_reason)
from nnunet_cl.splits import preprocessed_identifiers, validation_cases

POOL_FOLDER = "nnunet_cl_pool"
MANIFEST = "pool.json"
POOL_RECORD = "pretraining_pool.json"  # written by a pretraining into its fold folder: the pool it read


# ----------------------------------------------------------------------------------------------------------------
# reading the pool (used by pretraining)

def pool_root(preprocessed_dataset_folder: str) -> str:
    """nnUNet_preprocessed/DatasetXXX/nnunet_cl_pool."""
    return join(preprocessed_dataset_folder, POOL_FOLDER)


def pool_case_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    """Folder holding the pool cases of one configuration: nnunet_cl_pool/<data_identifier>."""
    return join(pool_root(preprocessed_dataset_folder), data_identifier)


def load_manifest(preprocessed_dataset_folder: str) -> dict:
    """pool.json as a dict ({} when nothing was ingested yet)."""
    fname = join(pool_root(preprocessed_dataset_folder), MANIFEST)
    if not isfile(fname):
        return {}
    with open(fname) as f:
        return json.load(f)


def _save_manifest(preprocessed_dataset_folder: str, manifest: dict) -> None:
    save_json_atomic(manifest, join(pool_root(preprocessed_dataset_folder), MANIFEST), indent=2)


def _case_on_disk(folder: str, identifier: str) -> bool:
    return all(isfile(join(folder, identifier + e)) for e in CASE_ENDINGS)


def pool_identifiers(preprocessed_dataset_folder: str, data_identifier: str,
                     exclude=()) -> list[tuple[str, str]]:
    """(folder, identifier) of every ingested pool case of this configuration, sorted, minus `exclude`.

    The manifest is the source of truth: a case counts only once it is in pool.json and all three files
    exist, so leftovers of an interrupted run are never read.
    """
    folder = pool_case_folder(preprocessed_dataset_folder, data_identifier)
    exclude = set(exclude)
    return [(folder, i) for i in sorted(load_manifest(preprocessed_dataset_folder))
            if i not in exclude and _case_on_disk(folder, i)]


def labeled_pool_members(preprocessed_dataset_folder: str, data_identifier: str,
                         fold: int | str) -> list[tuple[str, str]]:
    """(folder, identifier) of the labeled dataset's cases that pretraining on `fold` may use as images.

    That is every preprocessed case except the fold's validation cases (splits_final.json, or nnU-Net's default
    split when there is none); fold 'all' excludes nothing. Training cases left out of a limited split are
    included: only their labels are withheld.
    """
    folder = join(preprocessed_dataset_folder, data_identifier)
    if not isdir(folder):
        return []
    try:
        ids = preprocessed_identifiers(preprocessed_dataset_folder, data_identifier)
    except NnUNetCLError:
        return []
    val = set(validation_cases(preprocessed_dataset_folder, fold, data_identifier))
    return [(folder, i) for i in ids if i not in val]


def list_pool(preprocessed_dataset_folder: str, data_identifier: str, fold: int | str) -> list[tuple[str, str]]:
    """The self-supervised pool for one configuration and fold: labeled images minus validation, plus ingested cases.

    Returns (folder, identifier) pairs; load a case with
    `nnUNetDatasetBlosc2(folder, [identifier]).load_case(identifier)` and use only its data: the seg of a
    labeled member holds real labels (possibly withheld by a limited split), so self-supervised code must
    ignore it. Raises NnUNetCLError when the pool is empty.
    """
    members = labeled_pool_members(preprocessed_dataset_folder, data_identifier, fold) + \
        pool_identifiers(preprocessed_dataset_folder, data_identifier)
    if not members:
        name = basename(preprocessed_dataset_folder.rstrip(os.sep))
        raise NnUNetCLError(
            f"The pool is empty for {name}, configuration folder {data_identifier}, fold {fold}: no preprocessed "
            f"labeled cases outside the validation set and no ingested unlabeled cases. Fix: run "
            f"nnUNetv2_plan_and_preprocess -d {name} (with the configuration you train), and/or "
            f"nnUNetv2_cl_add_unlabeled -d {name} -i FOLDER_WITH_SCANS.")
    return members


# ----------------------------------------------------------------------------------------------------------------
# ingesting

def _sanitise(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "case"
    s = re.sub(r"_+", "_", s)
    if s.endswith("_seg"):
        s += "_"  # nnU-Net's dataset classes treat '<id>_seg.b2nd' as a segmentation, never as a case
    return "pool_" + s


def _unique_id(stem: str, taken: set) -> str:
    base = _sanitise(stem)
    case_id, n = base, 1
    while case_id in taken:
        n += 1
        case_id = f"{base}_{n}"
    taken.add(case_id)
    return case_id


def resolve_configurations(plans_manager, preprocessed_dataset_folder: str,
                           configurations=None) -> dict[str, list[str]]:
    """{data_identifier: [configuration names]} for the configurations the pool is made for.

    Default: every 3d configuration whose preprocessed folder is on disk, plus 3d_fullres if the plans have it;
    a 2d configuration when named (-c 2d). It stores 3d volumes too (at its own spacing), as nnU-Net preprocesses its labeled cases;
    its trainers take slices of them. Configurations sharing a data identifier (3d_cascade_fullres and
    3d_fullres; the same configuration of nnUNetPlans and the ResEnc presets) are preprocessed once.
    """
    available = plans_manager.available_configurations
    if configurations:
        unknown = [c for c in configurations if c not in available]
        if unknown:
            raise NnUNetCLError(f"Configuration(s) {unknown} are not in the plans (available: {available}). "
                                f"Fix: pick from those with -c.")
        chosen = list(configurations)
    else:
        chosen = [c for c in available if len(plans_manager.get_configuration(c).patch_size) == 3 and (
            c == "3d_fullres"
            or isdir(join(preprocessed_dataset_folder, plans_manager.get_configuration(c).data_identifier)))]
        if not chosen:
            raise NnUNetCLError(f"The plans have no 3d configuration (available: {available}). Fix: name the "
                                f"configuration to pretrain with -c (e.g. -c 2d).")
    out: dict[str, list[str]] = {}
    for c in chosen:
        out.setdefault(plans_manager.get_configuration(c).data_identifier, []).append(c)
    return out


def _process_source(source: dict, case_id: str, todo: dict[str, str], pool_folder: str, plans: dict,
                    dataset_json: dict, num_channels: int, limits: ScanLimits = ScanLimits()) -> dict:
    """Check, read and preprocess one source for the configurations in `todo` ({data_identifier: config}).

    Runs in worker processes, so it takes plain data and never raises: it returns {'ok': bool, ...}, with
    'reason' when not ok and 'warning' for a case added despite a doubt (modality mismatch).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    result = {"source": source, "case_id": case_id, "ok": False}
    plans_manager = PlansManager(plans)
    if not source["files"]:
        result["reason"] = "unreadable: no DICOM series found in the folder any more. Fix: restore the series"
        return result
    try:
        for f in source["files"] if source["kind"] != "dicom" else ():
            reason = check_file(f)
            if reason:
                result["reason"] = reason
                return result
        data, properties = read_source(source, plans_manager.image_reader_writer_class)
    except Exception as e:  # SimpleITK raises RuntimeError with a multi-line ITK trace; keep its gist
        msg = " ".join(str(e).split())
        msg = msg.split("sitk::ERROR:")[-1].strip()
        result["reason"] = f"unreadable: {msg[:300]}"
        return result
    reason = check_volume(data, properties, num_channels) or check_geometry(data.shape[1:], properties["spacing"],
                                                                            limits)
    for data_identifier, config in todo.items():  # before any work: a wrong header once asked for 36 GiB
        cm = plans_manager.get_configuration(config)
        reason = reason or resampled_size_reason(data.shape[1:], properties["spacing"], plans_manager.transpose_forward,
                                                 cm.spacing, data.shape[0], limits, config)
    if reason:
        result["reason"] = reason
        return result
    if source["kind"] == "dicom":
        warning = modality_warning(dicom_modality(source["files"][0]), dataset_json.get("channel_names", {}))
        if warning:
            result["warning"] = warning
    result["shape"] = [int(s) for s in data.shape[1:]]
    result["spacing"] = [float(s) for s in properties["spacing"]]
    result["preprocessed"] = {}
    try:
        for data_identifier, config in todo.items():
            configuration_manager = plans_manager.get_configuration(config)
            preprocessor = configuration_manager.preprocessor_class(verbose=False)
            d, seg, props = preprocessor.run_case_npy(data, None, copy.deepcopy(properties), plans_manager,
                                                      configuration_manager, dataset_json)
            props["class_locations"] = {}  # pool cases have no labels to oversample
            # same dtypes and blosc2 layout as DefaultPreprocessor.run_case_save
            d = d.astype(np.float32, copy=False)
            seg = seg.astype(np.int16, copy=False)
            patch_size = tuple(configuration_manager.patch_size)
            blocks, chunks = comp_blosc2_params(d.shape, patch_size, d.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
            out_folder = join(pool_folder, data_identifier)
            os.makedirs(out_folder, exist_ok=True)
            save_case_atomic(d, seg, props, out_folder, case_id, chunks=chunks, blocks=blocks,
                             chunks_seg=chunks_seg, blocks_seg=blocks_seg)
            result["preprocessed"][data_identifier] = {"shape": [int(s) for s in d.shape[1:]],
                                                       "spacing": [float(s) for s in configuration_manager.spacing]}
    except Exception as e:
        result["reason"] = f"preprocessing failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return result
    result["ok"] = True
    return result


def _load_plans_and_dataset_json(preprocessed_dataset_folder: str, plans_identifier: str, dataset: str):
    _, plans = load_plans(preprocessed_dataset_folder, plans_identifier, dataset)
    dataset_json_file = join(preprocessed_dataset_folder, "dataset.json")
    if not isfile(dataset_json_file):
        dataset_json_file = join(require_env("nnUNet_raw"), basename(preprocessed_dataset_folder), "dataset.json")
    if not isfile(dataset_json_file):
        raise NnUNetCLError(f"dataset.json not found in {preprocessed_dataset_folder} or nnUNet_raw. "
                            f"Fix: run nnUNetv2_plan_and_preprocess -d {dataset}.")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def add_unlabeled(dataset: str | int, input_folder: str, plans_identifier: str = "nnUNetPlans",
                  configurations=None, num_processes: int = 1, verbose: bool = True,
                  limits: ScanLimits = ScanLimits()) -> dict:
    """Ingest every volume below `input_folder` into the pool of `dataset`, preprocessed with its plans.

    Parameters
    ----------
    dataset : name or id of a planned (nnUNetv2_plan_and_preprocess) dataset
    input_folder : NIfTI/NRRD/MHA/MHD files and/or DICOM series folders, searched recursively
    plans_identifier : plans to preprocess with (-p)
    configurations : configurations (-c); default: the 3d ones preprocessed on disk, plus 3d_fullres
    num_processes : worker processes (-np)
    verbose : print skipped files as they come and a progress bar
    limits : spacing, field of view and memory bounds a scan must respect (nnunet_cl.scan_checks.ScanLimits)

    Returns a summary {'added': [case ids], 'updated': [ids that got a missing configuration],
    'repaired': [ids rebuilt from their source], 'already_present': [ids], 'skipped': {file name: reason},
    'warnings': {file name: warning}, 'broken': {case id: problem}, 'configurations': {data_identifier:
    [names]}, 'pool_folder': path}. Sources already in pool.json (same absolute path) are not processed
    again; bad files are skipped and reported, the rest goes on. Every case in pool.json is checked first
    (files readable, shape as recorded); a damaged one, e.g. from a killed run, is rebuilt from its source.
    'broken' lists those that could not be rebuilt: the pool is whole when it is empty.
    """
    if not (0 < limits.min_spacing <= limits.max_spacing and limits.max_extent_mm > 0 and limits.max_resampled_gib > 0):
        raise NnUNetCLError(f"Invalid scan limits {limits}: spacings must satisfy 0 < min <= max, the extent and "
                            f"memory limits must be positive. Fix: correct --min_spacing/--max_spacing/--max_extent/"
                            f"--max_memory_gb.")
    require_env("nnUNet_raw")
    base = require_env("nnUNet_preprocessed")
    name = dataset_name(dataset)
    folder = join(base, name)
    if not isdir(folder):
        raise NnUNetCLError(f"{folder} does not exist. Fix: run nnUNetv2_plan_and_preprocess -d {dataset} first.")
    plans, dataset_json = _load_plans_and_dataset_json(folder, plans_identifier, str(dataset))
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    targets = resolve_configurations(plans_manager, folder, configurations)
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))

    if not isdir(input_folder):
        raise NnUNetCLError(f"Input folder {input_folder} does not exist. Fix: pass a folder of scans with -i.")
    sources, not_images = find_sources(input_folder, num_channels)
    if not sources:
        raise NnUNetCLError(
            f"Nothing readable in {input_folder}: no image files (endings .nii.gz, .nii, .nrrd, .mha, .mhd) and "
            f"no DICOM series found" + (f" ({len(not_images)} broken DICOM file(s))" if not_images else "") +
            ". Fix: point -i at a folder holding the scans.")

    pool_folder = pool_root(folder)
    os.makedirs(pool_folder, exist_ok=True)
    for di in targets:
        remove_temporaries(join(pool_folder, di))
    manifest = load_manifest(folder)
    by_key = {v["source_key"] if "source_key" in v else v["source"]: k for k, v in manifest.items()}
    taken = set(manifest)
    # cases pool.json lists but whose files are damaged (killed run, truncated copy): rebuilt from their source
    broken = broken_cases(pool_folder, manifest, targets, num_channels)

    summary = {"added": [], "updated": [], "repaired": [], "already_present": [], "skipped": {}, "warnings": {},
               "broken": {}, "pool_folder": pool_folder, "configurations": targets}
    for bad in not_images:
        summary["skipped"][bad["name"]] = bad["reason"]
    tasks = [(source_from_entry(manifest[case_id], case_id), case_id, {di: targets[di][0] for di in problems})
             for case_id, problems in sorted(broken.items())]
    for s in sources:
        if s["key"] in by_key:
            case_id = by_key[s["key"]]
            if case_id in broken:
                continue  # queued above
            missing = {di: cs[0] for di, cs in targets.items()
                       if di not in manifest[case_id].get("preprocessed", {})
                       or not _case_on_disk(join(pool_folder, di), case_id)}
            if not missing:
                summary["already_present"].append(case_id)
                continue
            tasks.append((s, case_id, missing))
        else:
            tasks.append((s, _unique_id(s["stem"], taken), {di: cs[0] for di, cs in targets.items()}))

    def record(result):
        s, case_id = result["source"], result["case_id"]
        if not result["ok"]:
            summary["skipped"][s["name"]] = result["reason"]
            if case_id in broken:
                summary["broken"][case_id] = f"{'; '.join(broken[case_id].values())}; rebuilding failed: " \
                                             f"{result['reason']}"
            if verbose:
                tqdm.write(f"skipped {s['name']}: {result['reason']}")
            return
        if result.get("warning"):
            summary["warnings"][s["name"]] = result["warning"]
        entry = manifest.get(case_id)
        if entry is None:
            entry = {"source": s["key"].split("#")[0], "source_key": s["key"], "kind": s["kind"],
                     "shape": result["shape"], "spacing": result["spacing"], "preprocessed": {}}
            if s["kind"] == "channels":
                entry["files"] = s["files"]
            if s["series_uid"]:
                entry["series_uid"] = s["series_uid"]
            summary["added"].append(case_id)
        else:
            summary["repaired" if case_id in broken else "updated"].append(case_id)
        entry["preprocessed"].update(result["preprocessed"])
        manifest[case_id] = entry
        _save_manifest(folder, manifest)  # after every case, so an interrupted run keeps what it finished

    common = (pool_folder, plans, dataset_json, num_channels, limits)
    bar = tqdm(total=len(tasks), desc="Preprocessing unlabeled cases", disable=not verbose or not tasks)
    if num_processes <= 1 or len(tasks) <= 1:
        for s, case_id, todo in tasks:
            record(_process_source(s, case_id, todo, *common))
            bar.update()
    else:
        try:
            with ProcessPoolExecutor(min(num_processes, len(tasks)), mp_context=get_context("spawn")) as ex:
                futures = [ex.submit(_process_source, s, case_id, todo, *common) for s, case_id, todo in tasks]
                for fut in as_completed(futures):
                    record(fut.result())
                    bar.update()
        except BrokenProcessPool:
            raise NnUNetCLError(
                "A worker process died, most likely killed by the OS for running out of RAM. Cases finished so far "
                "are kept in pool.json. Fix: run again with fewer processes (-np), it continues where it stopped.")
    bar.close()

    if not any(summary[k] for k in ("added", "updated", "repaired", "already_present")):
        reasons = "; ".join(f"{k}: {v}" for k, v in summary["skipped"].items())
        raise NnUNetCLError(f"Nothing readable in {input_folder}: every file was skipped ({reasons}). "
                            f"Fix: check the files, the dataset expects {num_channels} channel(s) of 3D images.")
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable report of add_unlabeled's summary: counts, then one line per skipped or doubtful file."""
    lines = [f"Pool folder: {summary['pool_folder']}",
             f"Configurations: {', '.join(f'{c} ({di})' for di, cs in summary['configurations'].items() for c in cs)}",
             f"Added: {len(summary['added'])}" + (f" ({', '.join(summary['added'])})" if summary["added"] else "")]
    if summary["updated"]:
        lines.append(f"Completed with missing configurations: {len(summary['updated'])} "
                     f"({', '.join(summary['updated'])})")
    if summary.get("repaired"):
        lines.append(f"Rebuilt (damaged files in the pool): {len(summary['repaired'])} "
                     f"({', '.join(summary['repaired'])})")
    lines.append(f"Already present: {len(summary['already_present'])}")
    lines.append(f"Skipped: {len(summary['skipped'])}")
    lines += [f"  {k}: {v}" for k, v in sorted(summary["skipped"].items())]
    if summary.get("warnings"):
        lines.append(f"Added with a warning: {len(summary['warnings'])}")
        lines += [f"  {k}: {v}" for k, v in sorted(summary["warnings"].items())]
    return "\n".join(lines)


def _pool_not_whole(summary: dict) -> str:
    cases = "; ".join(f"{k}: {v}" for k, v in sorted(summary["broken"].items()))
    return (f"the pool is not whole: {len(summary['broken'])} case(s) in pool.json have damaged files and could "
            f"not be rebuilt ({cases}). Training would fail on them. Fix: restore their source files and run "
            f"again, or delete their entries from {join(summary['pool_folder'], MANIFEST)}.")


def main_add_unlabeled() -> None:
    """Entry point of nnUNetv2_cl_add_unlabeled."""
    from nnunetv2.configuration import default_num_processes
    d = ScanLimits()
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_cl_add_unlabeled",
        description="Add unlabeled scans (NIfTI, NRRD, MHA/MHD, DICOM series folders) to a dataset's pretraining "
                    "pool, preprocessed with the dataset's own plans. Re-running adds only new files and rebuilds "
                    "damaged pool cases (e.g. after a killed run).")
    parser.add_argument("-d", required=True, help="dataset name or id (must be planned and preprocessed)")
    parser.add_argument("-i", required=True, help="folder with the scans (searched recursively)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    parser.add_argument("-c", nargs="+", default=None,
                        help="configurations to preprocess for (2d too). Default: the 3d configurations already "
                             "preprocessed on disk, plus 3d_fullres")
    parser.add_argument("-np", type=int, default=default_num_processes,
                        help=f"number of processes. Default: {default_num_processes}")
    parser.add_argument("--min_spacing", type=float, default=d.min_spacing,
                        help=f"smallest accepted voxel spacing per axis, mm. Default: {d.min_spacing}")
    parser.add_argument("--max_spacing", type=float, default=d.max_spacing,
                        help=f"largest accepted voxel spacing per axis, mm. Default: {d.max_spacing}")
    parser.add_argument("--max_extent", type=float, default=d.max_extent_mm,
                        help=f"largest accepted field of view per axis, mm. Default: {d.max_extent_mm}")
    parser.add_argument("--max_memory_gb", type=float, default=d.max_resampled_gib,
                        help=f"largest float32 volume after resampling to a configuration's spacing, GiB. "
                             f"Default: {d.max_resampled_gib}")
    args = parser.parse_args()
    limits = ScanLimits(args.min_spacing, args.max_spacing, args.max_extent, args.max_memory_gb)
    try:
        summary = add_unlabeled(args.d, args.i, args.p, args.c, args.np, limits=limits)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_add_unlabeled: error: {e}")
    print(format_summary(summary))
    if summary["broken"]:
        raise SystemExit(f"nnUNetv2_cl_add_unlabeled: error: {_pool_not_whole(summary)}")


if __name__ == "__main__":
    main_add_unlabeled()
