"""Static dataset facts and the types every loader shares.

:class:`DatasetSpec` and :data:`SPECS` describe the datasets, :class:`Dataset`
holds one loaded dataset's arrays and :class:`DataError` reports bad or
missing input data.  The format modules import these from here, never from
the package, so that no import cycle arises.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset.

    Attributes:
      name: dataset key in :data:`SPECS`.
      input_shape: image shape ``(H, W, C)``.
      num_classes: number of classes.
      classes: class folder names, in label order (label = index).
      mean, std: per-channel statistics (length ``C``) of ``x / 255``.
    """

    name: str
    input_shape: tuple
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
_FMNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)

SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        input_shape=(28, 28, 1),
        num_classes=10,
        classes=_FMNIST_CLASSES,
        mean=(0.1307,),
        std=(0.3081,),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        input_shape=(32, 32, 3),
        num_classes=10,
        classes=_CIFAR_CLASSES,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
    ),
    "cinic10": DatasetSpec(
        name="cinic10",
        input_shape=(32, 32, 3),
        num_classes=10,
        classes=_CIFAR_CLASSES,
        mean=(0.4789, 0.4723, 0.4305),
        std=(0.2421, 0.2383, 0.2587),
    ),
}

# Where each dataset comes from, named in error messages.
_FMNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CINIC_URL = "https://datashare.ed.ac.uk/handle/10283/3192"


@dataclasses.dataclass
class Dataset:
    """Arrays of one dataset.

    Attributes:
      spec: the :class:`DatasetSpec`.
      train_x, test_x, valid_x: ``uint8 [N, H, W, C]``.
      train_y, test_y, valid_y: ``int32 [N]`` labels in ``[0, num_classes)``.
      valid_x / valid_y are only set for CINIC-10's ``valid`` split.
    """

    spec: DatasetSpec
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    valid_x: np.ndarray | None = None
    valid_y: np.ndarray | None = None


class DataError(ValueError):
    """Bad or missing input data; the message is one line naming the culprit."""
