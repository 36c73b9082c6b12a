"""No ``data_dir``: download the official files into the cache, or use TensorFlow Datasets.

The downloads (:mod:`fedredefense_jax.download`, Fashion-MNIST and CIFAR-10
only) are read as IDX files and CIFAR-10 python batches.  TensorFlow Datasets
(``$FEDREDEFENSE_TFDS=1``) is imported lazily, so that importing this package
never imports TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from fedredefense_jax.data.cifar_python import _CIFAR_PY_ARCHIVE, _load_cifar_python
from fedredefense_jax.data.idx import _load_idx_dir
from fedredefense_jax.data.specs import _CIFAR_URL, _CINIC_URL, _FMNIST_URL, DataError, Dataset, DatasetSpec

# Set to "1" to load fashion_mnist / cifar10 through TFDS when data_dir is None.
_TFDS_ENV = "FEDREDEFENSE_TFDS"


def _load_without_data_dir(spec: DatasetSpec, cache_dir: str | None) -> Dataset:
    """Download the official files into the cache (or use TFDS) and load them."""
    if spec.name == "cinic10":
        raise DataError(
            "cinic10 has no automatic download (its archive is over 700 MB): pass --data_dir "
            f"with the official CINIC-10 archive (CINIC-10.tar.gz from {_CINIC_URL}) or its "
            "extracted train/valid/test folder"
        )
    if os.environ.get(_TFDS_ENV) == "1":
        return _load_tfds(spec)
    from fedredefense_jax import download  # noqa: PLC0415 (download imports this package)

    directory = download.fetch(spec.name, cache_dir)
    if spec.name == "cifar10":
        return _load_cifar_python(spec, os.path.join(directory, _CIFAR_PY_ARCHIVE))
    return _load_idx_dir(spec, directory)



def _load_tfds(spec: DatasetSpec) -> Dataset:
    """Load fashion_mnist/cifar10 through TFDS (imported lazily)."""
    try:
        import tensorflow  # noqa: F401, PLC0415
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            f"{_TFDS_ENV}=1 loads {spec.name} through TensorFlow Datasets, which needs "
            f"TensorFlow ({e}): install the extra with `pip install -e .[tfds]`, unset "
            f"{_TFDS_ENV} to download the official files, or pass "
            "--data_dir pointing at the IDX files / image-folder tree or .tar.gz "
            f"(Fashion-MNIST IDX files: {_FMNIST_URL}; CIFAR-10: {_CIFAR_URL}, "
            f"{_CIFAR_PY_ARCHIVE} or a train|test/<class>/*.png tree)"
        ) from None

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = tfds.as_numpy(
            tfds.load(spec.name, split=name, batch_size=-1, as_supervised=True)
        )
        x = np.ascontiguousarray(x, dtype=np.uint8).reshape((-1,) + tuple(spec.input_shape))
        return x, np.asarray(y, dtype=np.int32)

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    return Dataset(spec, train_x, train_y, test_x, test_y)
