"""nnU-Net path variables and dataset lookup with errors that say what to fix."""
import json
import os
from os.path import dirname, isdir, join

_HELP = {
    "nnUNet_raw": "the folder with raw datasets (DatasetXXX_Name/imagesTr, labelsTr, dataset.json)",
    "nnUNet_preprocessed": "the folder nnUNetv2_plan_and_preprocess writes to",
    "nnUNet_results": "the folder trained models are written to",
}


class NnUNetCLError(RuntimeError):
    """A user-facing error: the message names the problem and the fix."""


def require_env(name: str) -> str:
    """Value of an nnU-Net path variable, or a clear error naming the variable and how to set it."""
    value = os.environ.get(name)
    if not value:
        raise NnUNetCLError(
            f"The environment variable {name} is not set. It must point to {_HELP.get(name, 'a folder')}. "
            f"Fix: export {name}=/path/to/folder (see nnU-Net's documentation/setting_up_paths.md).")
    return value


def dataset_name(dataset: str | int) -> str:
    """Resolve '4', 'Dataset004_Hippocampus' or 4 to the dataset folder name, like nnU-Net's -d.

    Raises NnUNetCLError listing the datasets that do exist when nothing matches.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    text = str(dataset)
    if text.startswith("Dataset"):
        name = text
    else:
        try:
            return convert_id_to_dataset_name(int(text))
        except ValueError:
            name = text
        except RuntimeError:
            name = None
    known = set()
    for var in ("nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"):
        base = os.environ.get(var)
        if base and isdir(base):
            known |= {d for d in os.listdir(base) if d.startswith("Dataset")}
    if name is not None and name in known:
        return name
    listing = ", ".join(sorted(known)) or "none"
    raise NnUNetCLError(
        f"Dataset {dataset!r} does not exist in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
        f"(found: {listing}). Fix: check the id, or convert and preprocess it first "
        f"(nnUNetv2_convert_MSD_dataset / nnUNetv2_plan_and_preprocess -d ID).")


def preprocessed_folder(dataset: str | int) -> str:
    """nnUNet_preprocessed/DatasetXXX_Name, which must exist."""
    folder = join(require_env("nnUNet_preprocessed"), dataset_name(dataset))
    if not isdir(folder):
        raise NnUNetCLError(f"{folder} does not exist. Fix: run nnUNetv2_plan_and_preprocess -d {dataset} first.")
    return folder


def save_json_atomic(obj, fname, indent: int = 4) -> None:
    """json.dump through a temporary file and os.replace: an interrupted run never leaves a half-written file."""
    fname = os.fspath(fname)
    if dirname(fname):
        os.makedirs(dirname(fname), exist_ok=True)
    tmp = fname + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
    os.replace(tmp, fname)


def load_plans(preprocessed_dataset_folder: str, plans_identifier: str, dataset: str | int) -> tuple[str, dict]:
    """(plans file, plans) of a preprocessed dataset, or an error saying how to make them."""
    plans_file = join(preprocessed_dataset_folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        found = sorted(f[:-5] for f in os.listdir(preprocessed_dataset_folder)
                       if f.endswith(".json") and f not in ("dataset.json", "dataset_fingerprint.json")
                       and not f.startswith("splits")) if isdir(preprocessed_dataset_folder) else []
        raise NnUNetCLError(f"Plans {plans_file} not found (plans present: {', '.join(found) or 'none'}). Fix: run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset} first, or pass the plans identifier with -p.")
    with open(plans_file) as f:
        return plans_file, json.load(f)


def is_msd_dataset_json(dataset_json: dict) -> bool:
    """An MSD task's dataset.json (`modality`, no `channel_names`): nnUNetv2_convert_MSD_dataset must convert it."""
    return "modality" in dataset_json and "channel_names" not in dataset_json


def resolved_configuration(plans: dict, name: str) -> dict:
    """`plans['configurations'][name]` with nnU-Net's `inherits_from` resolved: parents first, the child's keys win.

    Written out rather than through nnU-Net's PlansManager, which also builds the network's settings and so
    needs complete plans."""
    configs, chain = plans["configurations"], []
    while name is not None:
        if name not in configs or len(chain) >= len(configs):  # unknown, or a cycle
            raise NnUNetCLError(f"configuration {name!r} is not in the plans or inherits in a circle (available: "
                                f"{sorted(configs)}). Fix: pick one of them, or mend `inherits_from` in the plans.")
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    out = {}
    for c in reversed(chain):
        out.update(c)
    out.pop("inherits_from", None)
    return out
