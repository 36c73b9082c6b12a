"""Dataset loading for Fashion-MNIST, CIFAR-10 and CINIC-10.

All loaders return a :class:`Dataset` whose images are ``uint8 [N, H, W, C]``
and whose labels are ``int32 [N]``.  Sources:

1. ``data_dir`` is a directory holding the four official Fashion-MNIST IDX
   files (gzipped or not).  They are parsed with numpy.
2. ``data_dir`` is an image-folder tree ``<split>/<class>/*.{png,jpg,jpeg}``
   or a tar archive (``.tar.gz`` / ``.tgz`` / ``.tar``) holding such a tree,
   optionally below a single top-level folder.  Archives are streamed, never
   extracted to disk.  Decoded arrays are cached as an uncompressed ``.npz``.
3. CIFAR-10 only: ``data_dir`` is the official "python version" archive
   ``cifar-10-python.tar.gz``, its extracted ``cifar-10-batches-py``
   directory, or a directory holding either.  The pickles
   ``data_batch_1..5`` (train, in that order) and ``test_batch`` are read
   with a restricted unpickler that only builds numpy arrays.
4. ``data_dir is None``: the official files are downloaded once into
   ``<cache>/<dataset>/`` with md5 checks (:mod:`fedredefense_jax.download`;
   Fashion-MNIST and CIFAR-10 only) and read as in 1 and 3.  Offline, the
   error names the files to fetch and where to put them.  With
   ``$FEDREDEFENSE_TFDS=1`` TensorFlow Datasets is used instead, imported
   lazily so that importing this package never imports TensorFlow.

Every problem with the input data raises :class:`DataError` with a one-line
message naming the file or directory at fault.

One module per source: :mod:`~fedredefense_jax.data.idx` (1),
:mod:`~fedredefense_jax.data.image_folder` (2) with
:mod:`~fedredefense_jax.data.cache`, :mod:`~fedredefense_jax.data.cifar_python`
(3), :mod:`~fedredefense_jax.data.no_data_dir` (4); the shared types are in
:mod:`~fedredefense_jax.data.specs`.
"""

from __future__ import annotations

import os

import numpy as np

from fedredefense_jax.data.cache import _load_tree_cached, cache_path, default_cache_dir  # noqa: F401  (re-exported)
from fedredefense_jax.data.cifar_python import _find_cifar_python, _load_cifar_python
from fedredefense_jax.data.idx import _has_idx_files, _load_idx_dir, parse_idx  # noqa: F401  (re-exported)
from fedredefense_jax.data.image_folder import _all_splits, _has_splits, _single_subdir_with_splits
from fedredefense_jax.data.no_data_dir import _load_without_data_dir
from fedredefense_jax.data.specs import SPECS, DataError, Dataset, DatasetSpec

__all__ = [
    "DatasetSpec",
    "SPECS",
    "Dataset",
    "DataError",
    "load_dataset",
    "normalize",
]


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def normalize(x_uint8: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Scale to [0, 1] and standardise per channel.

    Args:
      x_uint8: ``uint8 [..., C]`` images (any leading dims), ``C`` as in spec.
      spec: dataset spec providing ``mean`` and ``std`` of length ``C``.
    Returns:
      ``float32 [..., C]`` array ``(x / 255 - mean) / std``.
    """
    x = np.asarray(x_uint8)
    channels = len(spec.mean)
    if x.ndim == 0 or x.shape[-1] != channels:
        raise ValueError(
            f"normalize: expected last axis of size {channels} for "
            f"{spec.name}, got shape {x.shape}"
        )
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return (x.astype(np.float32) / np.float32(255.0) - mean) / std


def get_spec(name: str) -> DatasetSpec:
    """Return ``SPECS[name]`` or raise DataError listing the valid names."""
    if name not in SPECS:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(sorted(SPECS))}"
        )
    return SPECS[name]


def load_dataset(
    name: str, data_dir: str | None = None, cache_dir: str | None = None
) -> Dataset:
    """Load a dataset as uint8 images and int32 labels.

    Args:
      name: one of ``SPECS`` ('fashion_mnist', 'cifar10', 'cinic10').
      data_dir: a directory of Fashion-MNIST IDX files, an image-folder tree
        ``<split>/<class>/*.{png,jpg,jpeg}``, a tar archive of such a tree,
        CIFAR-10's ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py``,
        or None to download the official files into the cache (TFDS
        instead when ``$FEDREDEFENSE_TFDS=1``).
      cache_dir: where downloads (``<cache_dir>/<dataset>/``) and decoded
        image-folder data are kept; default ``$FEDREDEFENSE_CACHE`` or
        ``~/.cache/fedredefense_jax``.
    Returns:
      a :class:`Dataset` (images ``uint8 [N, H, W, C]``, labels ``int32 [N]``).
    Raises:
      DataError: on any missing, malformed or inconsistent input.
    """
    spec = get_spec(name)
    if data_dir is None:
        return _load_without_data_dir(spec, cache_dir)
    path = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.exists(path):
        raise DataError(f"data_dir does not exist: {path}")
    if spec.name == "cifar10":
        cifar_py = _find_cifar_python(path)
        if cifar_py is not None:
            return _load_cifar_python(spec, cifar_py)
    if os.path.isdir(path):
        is_tree = _has_splits(path) or _single_subdir_with_splits(path)
        if spec.name == "fashion_mnist" and (_has_idx_files(path) or not is_tree):
            return _load_idx_dir(spec, path)
        if not is_tree:
            raise DataError(
                f"no image-folder tree in {path}: expected folders "
                f"{'/, '.join(_all_splits(spec))}/ holding <class>/*.png|jpg|jpeg"
            )
    return _load_tree_cached(spec, path, cache_dir)
