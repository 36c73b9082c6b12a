"""The doubly stochastic Dirichlet split and client data stacked for ``vmap``.

Split (the authors' setup): draw ``P ~ Dir(beta * 1_p)`` independently for each of the
``K`` classes, giving a ``[K, p]`` matrix whose row ``k`` says how class ``k`` is spread
over the ``p`` clients. Alternately normalise columns and rows (Sinkhorn, at most 1000
passes) until every row sums to 1 and every column to the same total, so every client
gets about ``N / p`` samples while keeping the Dirichlet skew of classes per client.
Class ``k``'s (shuffled) sample indices are then cut at ``floor(cumsum(P[k]) * n_k)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def doubly_stochastic(matrix: np.ndarray, max_passes: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Sinkhorn balancing of a positive ``[K, p]`` matrix: rows sum to 1, columns equal.

    Each pass divides every column by its sum, then every row by its sum.
    """
    x = np.asarray(matrix, np.float64).copy()
    for _ in range(max_passes):
        x = x / x.sum(axis=0, keepdims=True)
        x = x / x.sum(axis=1, keepdims=True)
        col = x.sum(axis=0)
        if np.max(np.abs(col - col.mean())) < tol:
            break
    return x


def dirichlet_split(labels: np.ndarray, num_clients: int, beta: float, seed: int,
                    num_classes: int | None = None) -> list[np.ndarray]:
    """Indices of each client's samples, ``num_clients`` int64 arrays (deterministic in seed)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    labels = np.asarray(labels)
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    rng = np.random.default_rng(seed)
    # Tiny beta can draw exact zeros in float64; keep the matrix positive for Sinkhorn.
    props = np.maximum(rng.dirichlet(np.full(num_clients, beta), size=k), 1e-300)
    props = doubly_stochastic(props)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(props[c])[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclasses.dataclass
class ClientData:
    """Client datasets padded to a common length, leading axis = client.

    Attributes:
      x: uint8 ``[p, n_max, H, W, C]`` (rows past ``counts[i]`` are zero padding).
      y: int32 ``[p, n_max]`` (padding label 0).
      counts: int32 ``[p]`` real samples per client.
    """

    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])


def stack_clients(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> ClientData:
    """Gathers each client's samples into padded arrays with a leading client axis."""
    counts = np.array([len(p) for p in parts], np.int32)
    n_max = int(max(1, counts.max()))
    cx = np.zeros((len(parts), n_max, *x.shape[1:]), x.dtype)
    cy = np.zeros((len(parts), n_max), np.int32)
    for i, p in enumerate(parts):
        cx[i, : len(p)] = x[p]
        cy[i, : len(p)] = y[p]
    return ClientData(cx, cy, counts)


def split_stats(labels: np.ndarray, parts: list[np.ndarray], num_classes: int = 10,
                share: float = 0.05) -> dict:
    """min/mean/max samples per client and the mean number of classes holding >= ``share``."""
    counts = np.array([len(p) for p in parts])
    hist = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    frac = hist / np.maximum(counts[:, None], 1)
    return {
        "min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max()),
        "classes_ge_share": float((frac >= share).sum(1).mean()),
        "total": int(counts.sum()),
    }


def server_sample(parts: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """Indices of the server's root dataset (FLTrust): ``min(size, N)`` training samples
    drawn uniformly without replacement from the union of the clients' samples (``N`` of
    them; with the Dirichlet split this is the whole training set), sorted.

    As FLTrust's default setting, the root data are clean samples of the clients'
    training distribution; they are not removed from the clients' datasets. Deterministic
    in ``seed`` and independent of the split's own random stream.
    """
    pool = np.unique(np.concatenate([np.asarray(p, np.int64) for p in parts])) if parts else np.zeros(0, np.int64)
    rng = np.random.default_rng([int(seed), 0x5E7])
    take = min(max(int(size), 0), pool.size)
    return np.sort(rng.choice(pool, size=take, replace=False))


def subset_train(ds, size: int, seed: int):
    """``ds`` (a ``data.Dataset``) with ``size`` of its training images, drawn uniformly
    without replacement (deterministic in ``seed``, independent of the Dirichlet split's
    draws) and kept in their original order; test data unchanged.

    Scales a federation down without changing each client's data size: 30 clients over
    18,000 images hold about 600 images each, as 100 clients over Fashion-MNIST's 60,000.
    """
    n = len(ds.train_y)
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be in [1, {n}], got {size}")
    rng = np.random.default_rng([int(seed), 0x5b5e7])
    keep = np.sort(rng.choice(n, size, replace=False))
    return dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
