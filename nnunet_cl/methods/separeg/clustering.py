"""SepaReg IID step (i): k-means of region embeddings into pseudo-organs, and per-expert batches."""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np

__all__ = ["kmeans_regions", "expert_blocks"]


def kmeans_regions(embeddings: np.ndarray, k: int, seed: int = 0, n_init: int = 10, normalize: bool = True,
                   max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """k-means of region embeddings (N, D) with scikit-learn.

    ``normalize=True`` L2-normalises the rows first (SimSiam/BYOL embeddings are compared by cosine, so
    this is k-means on the unit sphere's chords). ``n_init`` is fixed, ``random_state=seed``: the same
    input and seed give the same result. Clusters are renumbered by first occurrence in the input order
    (region 0 is in cluster 0, the next new cluster is 1, ...), so ids do not depend on k-means' internal
    order. When N (or the number of distinct rows) is smaller than k, k is reduced with a warning.

    Returns:
        (assignments int64 (N,), centroids float (k', D) in the space that was clustered).
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array; got shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_distinct = np.unique(x, axis=0).shape[0]
    if n_distinct < k:
        warnings.warn(f"kmeans_regions: only {n_distinct} distinct embeddings (N={x.shape[0]}) for k={k}; "
                      f"using k={n_distinct}", RuntimeWarning, stacklevel=2)
        k = n_distinct
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=max_iter).fit(x)
    raw = km.labels_.astype(np.int64)
    _, first = np.unique(raw, return_index=True)
    order = raw[np.sort(first)]                # raw cluster ids by first occurrence
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(order.size)
    return remap[raw], km.cluster_centers_[order]


def expert_blocks(assignments: np.ndarray, n_per_expert: int, generator: np.random.Generator | int | None = None,
                  blocks_per_cluster: int | None = None, pad: bool = True) -> Iterator[np.ndarray]:
    """One epoch of index blocks, each block from a single cluster (one expert per step).

    Every cluster's indices are shuffled and cut into blocks of ``n_per_expert``. A cluster's last, short
    block is topped up with random indices of the same cluster (``pad=True``; clusters smaller than a block
    still give one full block, so small organs keep their expert) or yielded short (``pad=False``).
    ``blocks_per_cluster`` instead gives every cluster exactly that many blocks (balanced sampling: small
    clusters are cycled through, reshuffled on each pass). The order of all blocks is shuffled.
    The cluster of a block is ``assignments[block[0]]``. Regions with a negative id (not clustered) are never
    drawn.

    Args:
        assignments: (N,) cluster id per region, -1 for regions left out of the clustering.
        generator: numpy Generator or seed (the iterator is deterministic given it).
    """
    a = np.asarray(assignments).ravel()
    if n_per_expert < 1:
        raise ValueError(f"n_per_expert must be >= 1; got {n_per_expert}")
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    blocks: list[np.ndarray] = []
    for c in np.unique(a[a >= 0]):
        idx = np.flatnonzero(a == c)
        if blocks_per_cluster is not None:
            need = blocks_per_cluster * n_per_expert
            passes = -(-need // idx.size)
            seq = np.concatenate([rng.permutation(idx) for _ in range(passes)])[:need]
            blocks.extend(seq.reshape(blocks_per_cluster, n_per_expert))
            continue
        perm = rng.permutation(idx)
        for start in range(0, perm.size, n_per_expert):
            blk = perm[start:start + n_per_expert]
            if blk.size < n_per_expert and pad:
                blk = np.concatenate([blk, rng.choice(idx, n_per_expert - blk.size, replace=True)])
            blocks.append(blk)
    for i in rng.permutation(len(blocks)):
        yield np.asarray(blocks[i], dtype=np.int64)
