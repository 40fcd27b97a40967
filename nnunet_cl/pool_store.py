"""Pool cases on disk: written whole or not at all, checked before they are trusted.

A case of configuration folder D is `D/<id>.b2nd`, `D/<id>_seg.b2nd` and `D/<id>.pkl`, written by nnU-Net's
`nnUNetDatasetBlosc2.save_case` under `.tmp_<id>.*` and renamed into place, so a run killed mid-write leaves
only temporaries, which the next run deletes. `broken_cases` checks what pool.json lists against the files
(readable, shape as recorded), so the next run rebuilds a damaged case from its source.
"""
import os
from os.path import isdir, isfile, join

CASE_ENDINGS = (".b2nd", "_seg.b2nd", ".pkl")
_TMP_PREFIX = ".tmp_"  # a case is written as .tmp_<id>.* and renamed into place


def case_problem(folder: str, identifier: str, shape, num_channels: int) -> str | None:
    """Why a stored pool case is not whole (a file missing or unreadable, another shape than pool.json
    says), or None. Opening a .b2nd reads its frame trailer, so a truncated file fails here."""
    import blosc2
    missing = [identifier + e for e in CASE_ENDINGS if not isfile(join(folder, identifier + e))]
    if missing:
        return f"missing {', '.join(missing)}"
    if os.path.getsize(join(folder, identifier + ".pkl")) == 0:
        return f"{identifier}.pkl is empty"
    for ending, channels in ((".b2nd", num_channels), ("_seg.b2nd", 1)):
        try:
            found = tuple(blosc2.open(urlpath=join(folder, identifier + ending), mode="r").shape)
        except Exception as e:  # blosc2 raises RuntimeError/ValueError for a damaged frame
            return f"{identifier}{ending} unreadable ({type(e).__name__})"
        if found != (channels, *shape):
            return f"{identifier}{ending} has shape {found}, pool.json says {(channels, *shape)}"
    return None


def remove_temporaries(folder: str) -> None:
    """Delete what a killed run left half-written (blosc2 refuses to write over an existing file)."""
    if isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(_TMP_PREFIX):
                os.remove(join(folder, f))


def save_case_atomic(data, seg, props, out_folder: str, case_id: str, **blosc2_params) -> None:
    """nnUNetDatasetBlosc2.save_case under temporary names, then renamed: a case file is whole or absent."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    tmp = join(out_folder, _TMP_PREFIX + case_id)
    for e in CASE_ENDINGS:
        if isfile(tmp + e):
            os.remove(tmp + e)
    nnUNetDatasetBlosc2.save_case(data, seg, props, tmp, **blosc2_params)
    for e in CASE_ENDINGS:  # .pkl last: a case counts as on disk only once all three are in place
        os.replace(tmp + e, join(out_folder, case_id + e))


def source_from_entry(entry: dict, case_id: str) -> dict:
    """The `find_sources`-style source of a pool.json entry, to preprocess the case again."""
    files = entry.get("files") or [entry["source"]]
    if entry.get("kind") == "dicom":  # slice files are not recorded: ask GDCM again
        import SimpleITK as sitk
        args = (entry["source"], entry["series_uid"]) if entry.get("series_uid") else (entry["source"],)
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(*args)) if isdir(entry["source"]) else []
    return {"key": entry.get("source_key", entry["source"]), "name": f"{case_id} (pool case, from {entry['source']})",
            "stem": case_id, "kind": entry.get("kind", "file"), "files": files, "series_uid": entry.get("series_uid")}


def broken_cases(pool_folder: str, manifest: dict, data_identifiers, num_channels: int) -> dict:
    """{case id: {data_identifier: problem}} for every pool.json case whose files of a recorded configuration
    (among `data_identifiers`) are not whole."""
    out = {}
    for case_id, entry in manifest.items():
        for di, info in entry.get("preprocessed", {}).items():
            if di in data_identifiers:
                problem = case_problem(join(pool_folder, di), case_id, info["shape"], num_channels)
                if problem:
                    out.setdefault(case_id, {})[di] = problem
    return out
