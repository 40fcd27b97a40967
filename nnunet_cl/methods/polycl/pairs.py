"""PolyCL cross-image example selection on 3-D patches (METHODS_SPEC §4).

PolyCL (Ward, Moseley, Imran 2025) picks positives and negatives *across images* instead of building
two augmented views of one image. The paper works on 2-D axial slices; here the unit is a 3-D patch.
Every patch in a batch carries

* ``case_id`` (int): which scan it was cropped from;
* ``organ_present``: 1/True if the patch contains the organ, 0/False if not, and -1 or None when the
  presence is unknown (a case from the unlabeled pool).

Three strategies decide who is a positive and who a negative for an anchor patch i:

========  ===========================================  ============================================
strategy  positive j                                   negative j
========  ===========================================  ============================================
``"S"``   same case, j != i                            other case
``"O"``   same organ presence (any case), j != i       opposite organ presence (any case)
``"M"``   same case AND same organ presence, j != i    other case AND organ absent
========  ===========================================  ============================================

Only S is label-free. For O and M, presence is a patch-level label (cheap, but an annotation).

**Unknown-presence fallback (our choice; the paper has no unlabeled scans in O/M).** Under O and M an
anchor with unknown presence is treated exactly as under S (positives = other patches of its case,
negatives = patches of other cases, whatever their presence), and an unknown-presence patch is never a
positive or a negative for an anchor whose presence is known, because its presence cannot be compared.
This lets a pretraining batch mix the labelled and the unlabeled pool without discarding the latter.

M follows the paper's code literally: the negative is a slice of *another scan that does not contain the
organ*, whatever the anchor's own presence. So an organ-free anchor gets organ-free negatives from other
scans; other scans' organ patches are neither positive nor negative under M.

Everything here is plain numpy index logic (no autograd) and deterministic for a given
``np.random.Generator``; the masks are numpy bool arrays that ``loss.polycl_infonce_loss`` moves to torch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nnunet_cl.paths import NnUNetCLError

__all__ = [
    "STRATEGIES",
    "normalize_presence",
    "strategy_masks",
    "valid_anchor_mask",
    "sample_triplets",
    "patch_organ_presence",
    "organ_class_locations",
    "presence_from_class_locations",
    "sample_patch_batch",
]

STRATEGIES = ("S", "O", "M")
UNKNOWN = -1


def _to_numpy(x) -> np.ndarray:
    """Accept lists, numpy arrays and (CPU or GPU) torch tensors."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def normalize_presence(organ_present, n: int) -> np.ndarray:
    """Organ presence as an int8 array of length n: 1 present, 0 absent, -1 unknown.

    ``organ_present`` may be None (everything unknown), or a sequence/array/tensor of bools, 0/1, -1 or
    None entries. Any negative number means unknown.
    """
    if organ_present is None:
        return np.full(n, UNKNOWN, dtype=np.int8)
    if isinstance(organ_present, (list, tuple)):
        values = [UNKNOWN if v is None else int(v) for v in organ_present]
        arr = np.asarray(values, dtype=np.int64)
    else:
        arr = _to_numpy(organ_present)
        if arr.dtype == object:
            arr = np.asarray([UNKNOWN if v is None else int(v) for v in arr.ravel()], dtype=np.int64)
        arr = arr.astype(np.int64).ravel()
    if arr.shape != (n,):
        raise ValueError(f"organ_present must have one entry per patch ({n}), got shape {arr.shape}")
    out = np.where(arr < 0, UNKNOWN, (arr > 0).astype(np.int64))
    return out.astype(np.int8)


def _check_strategy(strategy: str) -> str:
    s = str(strategy).upper()
    if s not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return s


def strategy_masks(case_ids, organ_present=None, strategy: str = "S") -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative masks for the many-negatives (InfoNCE) form of PolyCL.

    Args:
        case_ids: (N,) int, the scan each patch comes from.
        organ_present: (N,) presence flags (see ``normalize_presence``); None = all unknown.
        strategy: "S", "O" or "M" (table in the module docstring).

    Returns:
        ``(pos_mask, neg_mask)``, each an (N, N) numpy bool array; row i is anchor i. The diagonal is
        always False in both (an anchor is never its own positive). A pair is never in both masks.
        Rows may be empty (e.g. a case with a single patch under S, or an organ-free scan under M with
        no organ-free patch elsewhere); ``valid_anchor_mask`` tells which anchors can be used.
    """
    strategy = _check_strategy(strategy)
    cases = _to_numpy(case_ids).astype(np.int64).ravel()
    n = cases.shape[0]
    pres = normalize_presence(organ_present, n)

    same_case = cases[:, None] == cases[None, :]
    not_self = ~np.eye(n, dtype=bool)
    s_pos = same_case & not_self
    s_neg = ~same_case
    if strategy == "S":
        return s_pos, s_neg

    known = pres >= 0
    both_known = known[:, None] & known[None, :]
    same_pres = (pres[:, None] == pres[None, :]) & both_known
    if strategy == "O":
        pos = same_pres & not_self
        neg = both_known & (pres[:, None] != pres[None, :])
    else:  # "M"
        pos = same_case & same_pres & not_self
        absent = pres == 0
        neg = (~same_case) & known[:, None] & absent[None, :]
    # Unknown-presence anchors fall back to S (their whole row); unknown columns are already excluded
    # for known anchors because both_known is False there.
    unknown_rows = ~known
    pos[unknown_rows] = s_pos[unknown_rows]
    neg[unknown_rows] = s_neg[unknown_rows]
    return pos, neg


def valid_anchor_mask(pos_mask: np.ndarray, neg_mask: np.ndarray) -> np.ndarray:
    """(N,) bool: anchors with at least one positive AND one negative (the paper skips the others)."""
    return np.asarray(pos_mask).any(axis=1) & np.asarray(neg_mask).any(axis=1)


def sample_triplets(case_ids, organ_present=None, strategy: str = "S",
                    rng: np.random.Generator | None = None,
                    max_tries: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One positive and one negative per anchor, the paper's triplet form, drawn inside the batch.

    Every patch is tried as an anchor, in batch order. Two ways to draw:

    * ``max_tries=None`` (default): the positive and the negative are drawn uniformly from the anchor's
      valid sets (``strategy_masks``); an anchor is skipped only when one of the sets is empty. Inside a
      batch we know the valid sets exactly, so rejection sampling would only lose anchors.
    * ``max_tries=k``: the paper's procedure (up to k random draws among the other patches of the batch,
      then the anchor is excluded), for exact faithfulness. With 16 patches and 2 per case, k=10 loses
      about half the S anchors, which is why it is not the default.

    Args:
        case_ids, organ_present, strategy: as in ``strategy_masks``.
        rng: ``np.random.Generator``; the only source of randomness (same seed -> same triplets).
        max_tries: None, or the number of rejection draws per anchor for the positive and for the negative.

    Returns:
        ``(anchor_idx, pos_idx, neg_idx)``, int64 arrays of equal length <= N.
    """
    if rng is None:
        rng = np.random.default_rng()
    if max_tries is not None and max_tries < 1:
        raise ValueError(f"max_tries must be None or >= 1, got {max_tries}")
    pos_mask, neg_mask = strategy_masks(case_ids, organ_present, strategy)
    n = pos_mask.shape[0]
    anchors, positives, negatives = [], [], []
    for i in range(n):
        p = _draw(pos_mask[i], i, rng, max_tries)
        if p is None:
            continue
        q = _draw(neg_mask[i], i, rng, max_tries)
        if q is None:
            continue
        anchors.append(i)
        positives.append(p)
        negatives.append(q)
    as_idx = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as_idx(anchors), as_idx(positives), as_idx(negatives)


def _draw(valid_row: np.ndarray, anchor: int, rng: np.random.Generator, max_tries: int | None) -> int | None:
    if max_tries is None:
        candidates = np.flatnonzero(valid_row)
        return int(rng.choice(candidates)) if candidates.size else None
    others = np.delete(np.arange(valid_row.shape[0]), anchor)
    if others.size == 0:
        return None
    for _ in range(max_tries):
        j = int(rng.choice(others))
        if valid_row[j]:
            return j
    return None


def _label_set(organ_labels) -> set[int] | None:
    if organ_labels is None:
        return None
    if isinstance(organ_labels, (int, np.integer)):
        return {int(organ_labels)}
    return {int(v) for v in organ_labels}


def patch_organ_presence(seg_patch, organ_labels=None) -> bool:
    """True if any voxel of ``seg_patch`` carries one of ``organ_labels``.

    Args:
        seg_patch: label patch of any shape (numpy array or torch tensor), e.g. nnU-Net's (1, x, y, z)
            target. nnU-Net's padding value -1 and the ignore label simply never match an organ label.
        organ_labels: an int, an iterable of ints, or None for "any label > 0" (the paper's max(seg) > 0).
    """
    seg = _to_numpy(seg_patch)
    labels = _label_set(organ_labels)
    if labels is None:
        return bool((seg > 0).any())
    return bool(np.isin(seg, np.fromiter(labels, dtype=np.int64)).any())


def organ_class_locations(class_locations: Mapping | None, organ_labels=None) -> dict:
    """The non-empty entries of nnU-Net's ``class_locations`` that count as "the organ".

    organ_labels None: every foreground key (any key with a label > 0); otherwise keys sharing a label with
    ``organ_labels``. A key holding -1 (nnU-Net's annotated-area key, present with an ignore label) is never
    an organ.
    """
    wanted = _label_set(organ_labels)
    out = {}
    for key, coords in (class_locations or {}).items():
        labels = {int(k) for k in key} if isinstance(key, (tuple, list)) else {int(key)}
        if -1 in labels or (not labels - {0} if wanted is None else not labels & wanted):
            continue
        if len(coords):
            out[key] = coords
    return out


def presence_from_class_locations(class_locations: Mapping | None, bbox: Sequence[Sequence[int]],
                                  organ_labels=None) -> bool:
    """Organ presence of a patch from nnU-Net's ``class_locations``, without loading the segmentation.

    Args:
        class_locations: the preprocessed case's ``properties['class_locations']``: label (or a tuple of
            labels for region training) -> array (n, 1 + ndim) of voxel coordinates, channel first.
            An empty dict or None means the case has no foreground at all -> False.
        bbox: ``[[lb, ub), ...]`` per spatial axis, upper bound exclusive, in preprocessed-array voxels:
            exactly the ``bbox`` nnU-Net's data loader builds (lower bounds may be negative = padding).
        organ_labels: int, iterable of ints, or None (every foreground key, i.e. any key other than 0).
            A tuple key (region) counts when it shares a label with ``organ_labels``.

    Caveat: nnU-Net stores a random subsample of each class's voxels (>= 10,000 or 1%), so a patch that
    grazes only a few organ voxels can be reported as organ-free. Use ``patch_organ_presence`` on the
    cropped segmentation when that matters.
    """
    organ_locations = organ_class_locations(class_locations, organ_labels)
    if not organ_locations:
        return False
    bbox = np.asarray(bbox, dtype=np.int64)
    if bbox.ndim != 2 or bbox.shape[1] != 2:
        raise ValueError(f"bbox must be [[lb, ub], ...] per spatial axis, got {bbox.tolist()}")
    lbs, ubs = bbox[:, 0], bbox[:, 1]
    for coords in organ_locations.values():
        spatial = np.asarray(coords)[:, 1:]  # column 0 is the channel
        if spatial.shape[1] != lbs.shape[0]:
            raise ValueError(f"class_locations have {spatial.shape[1]} spatial axes but bbox has {lbs.shape[0]}")
        if np.any(np.all((spatial >= lbs) & (spatial < ubs), axis=1)):
            return True
    return False


def sample_patch_batch(cases: int | Sequence, n_cases: int, patches_per_case: int,
                       rng: np.random.Generator | None = None) -> list[int]:
    """Which case each patch of the next batch comes from, so that S always has positives and negatives.

    ``n_cases`` distinct cases are drawn without replacement, each contributing ``patches_per_case``
    consecutive patches: every patch then has >= 1 same-case positive and the other cases as negatives.

    Args:
        cases: the number of cases, or a sequence of cases (only its length is used).
        n_cases: distinct cases per batch (>= 2, or there is no negative). When fewer cases exist, all of
            them are used and the patches are spread over them so the batch size stays
            ``n_cases * patches_per_case`` (more patches per case, never fewer than ``patches_per_case``).
        patches_per_case: >= 2, or there is no S positive.
        rng: ``np.random.Generator`` (same seed -> same batch).

    Returns:
        A list of case indices (into ``cases``), length ``n_cases * patches_per_case``, grouped by case.
    """
    if rng is None:
        rng = np.random.default_rng()
    n_available = cases if isinstance(cases, (int, np.integer)) else len(cases)
    if patches_per_case < 2:
        raise NnUNetCLError(f"patches_per_case={patches_per_case}: PolyCL-S needs >= 2 patches per case "
                            f"so that every anchor has a same-case positive. Fix: use 2 or more.")
    if n_cases < 2:
        raise NnUNetCLError(f"n_cases={n_cases}: PolyCL needs >= 2 cases per batch so that every anchor has "
                            f"a negative from another case. Fix: use 2 or more.")
    if n_available < 2:
        raise NnUNetCLError(f"Only {n_available} case(s) available; PolyCL needs >= 2 cases for negatives. "
                            f"Fix: add cases to the training pool (or the unlabeled pool).")
    batch_size = n_cases * patches_per_case
    k = min(n_cases, n_available)
    chosen = rng.choice(n_available, size=k, replace=False)
    # Spread batch_size patches over k cases as evenly as possible (each >= patches_per_case as k <= n_cases).
    counts = np.full(k, batch_size // k)
    counts[: batch_size % k] += 1
    out: list[int] = []
    for case, c in zip(chosen.tolist(), counts.tolist()):
        out.extend([int(case)] * c)
    return out

