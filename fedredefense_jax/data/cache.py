"""Cache of decoded image-folder data: one uncompressed ``.npz`` per dataset and source."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings

import numpy as np

from fedredefense_jax.data.image_folder import _load_tree
from fedredefense_jax.data.specs import Dataset, DatasetSpec

# Bump when the cache file layout or decoding changes.
_CACHE_VERSION = "1"


def default_cache_dir() -> str:
    """``$FEDREDEFENSE_CACHE`` if set, else ``~/.cache/fedredefense_jax``."""
    env = os.environ.get("FEDREDEFENSE_CACHE")
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "fedredefense_jax")


def cache_path(spec: DatasetSpec, path: str, cache_dir: str) -> str:
    """Cache file for dataset ``spec`` decoded from ``path``.

    The key hashes the absolute path, its size and mtime, and the dataset name.
    """
    st = os.stat(path)
    key = "|".join(
        [_CACHE_VERSION, os.path.abspath(path), str(st.st_size), str(st.st_mtime_ns), spec.name]
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    return os.path.join(cache_dir, f"{spec.name}-{digest}.npz")


_CACHE_FIELDS = ("train_x", "train_y", "test_x", "test_y", "valid_x", "valid_y")


def _read_cache(spec: DatasetSpec, file: str) -> Dataset | None:
    """Dataset stored at ``file``, or None if absent or unreadable."""
    if not os.path.isfile(file):
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _CACHE_FIELDS if k in z.files}
        ds = Dataset(spec, **arrays)
        for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
            if x.shape[1:] != tuple(spec.input_shape) or x.shape[0] != y.shape[0]:
                raise ValueError("shape mismatch")
        return ds
    except Exception as e:  # corrupt/stale cache: fall back to decoding
        warnings.warn(f"ignoring unreadable cache file {file}: {e}", stacklevel=3)
        return None


def _write_cache(ds: Dataset, file: str) -> None:
    """Atomically write ``ds`` as an uncompressed npz (temp file + os.replace)."""
    arrays = {
        k: getattr(ds, k) for k in _CACHE_FIELDS if getattr(ds, k) is not None
    }
    directory = os.path.dirname(file)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write cache file {file}: {e}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _load_tree_cached(spec: DatasetSpec, path: str, cache_dir: str | None) -> Dataset:
    """Load an image-folder tree/archive through the ``.npz`` cache."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    file = cache_path(spec, path, cache_dir)
    ds = _read_cache(spec, file)
    if ds is None:
        ds = _load_tree(spec, path)
        _write_cache(ds, file)
    return ds
