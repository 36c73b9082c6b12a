"""CIFAR-10's "python version": the pickled batches of ``cifar-10-python.tar.gz``.

``data_dir`` is the archive, its extracted ``cifar-10-batches-py`` directory,
or a directory holding either.  The pickles ``data_batch_1..5`` (train, in that
order) and ``test_batch`` are read with a restricted unpickler that only builds
numpy arrays.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib

import numpy as np

from fedredefense_jax.data.image_folder import _is_image_name
from fedredefense_jax.data.specs import DataError, Dataset, DatasetSpec

# CIFAR-10 "python version": pickled batches inside cifar-10-batches-py/.
_CIFAR_PY_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_PY_DIR = "cifar-10-batches-py"
_CIFAR_PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_PY_TEST = "test_batch"
_CIFAR_PY_BATCHES = _CIFAR_PY_TRAIN + (_CIFAR_PY_TEST,)


def _find_cifar_python(path: str) -> str | None:
    """The CIFAR-10 python archive or batches directory that ``path`` names.

    ``path`` may be the archive itself (any tar whose first batch-or-image
    member is a batch pickle), a directory holding the pickles
    (``cifar-10-batches-py``), or a directory holding ``cifar-10-batches-py/``
    or ``cifar-10-python.tar.gz``.  Returns None for anything else.
    """
    if os.path.isfile(path):
        return path if _is_cifar_python_archive(path) else None
    for candidate in (path, os.path.join(path, _CIFAR_PY_DIR)):
        if any(os.path.isfile(os.path.join(candidate, b)) for b in _CIFAR_PY_BATCHES):
            return candidate
    archive = os.path.join(path, _CIFAR_PY_ARCHIVE)
    return archive if os.path.isfile(archive) else None


def _is_cifar_python_archive(path: str) -> bool:
    """True if the tar at ``path`` holds CIFAR-10 batch pickles, not images.

    Reads member headers until the first batch pickle or image file, so only
    the start of the archive is decompressed.
    """
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if member.isfile() and base in _CIFAR_PY_BATCHES:
                    return True
                if member.isfile() and _is_image_name(member.name):
                    return False
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return False  # not a (readable) tar: the image-folder reader reports it
    return False


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dtypes and plain containers.

    The CIFAR-10 batches reference ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype`` (``numpy._core`` when pickled by
    numpy 2); any other global is refused, so a hostile file cannot run code.
    """

    _RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array-rebuilding function
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,  # protocol 5
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _parse_cifar_batch(raw: bytes, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch.

    Args:
      raw: the pickle: a dict with ``b"data"`` (``uint8 [n, 3072]``, each row
        the 1024 red, then green, then blue values of a 32x32 image in row
        order) and ``b"labels"`` (n ints); str keys are accepted too.
      num_classes: labels must lie in ``[0, num_classes)``.
      where: member or file name used in error messages.
    Returns:
      (``uint8 [n, 32, 32, 3]``, ``int32 [n]``).
    """
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on bad data
        raise DataError(f"{where}: not a CIFAR-10 batch pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{where}: no {key!r} entry (keys: {sorted(map(str, batch))})")
    x = batch["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{where}: 'data' is {desc}, expected uint8 (N, 3072)")
    try:
        y = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{where}: 'labels' are not integers ({e})") from None
    if y.shape != (x.shape[0],):
        raise DataError(f"{where}: {y.size} labels for {x.shape[0]} images")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{where}: label {bad} out of range [0, {num_classes})")
    images = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), y.astype(np.int32)


def _read_cifar_batches(path: str) -> dict[str, tuple[bytes, str]]:
    """``{batch name: (pickle bytes, name for messages)}`` from an archive or directory."""
    found: dict[str, tuple[bytes, str]] = {}
    if os.path.isdir(path):
        for b in _CIFAR_PY_BATCHES:
            file = os.path.join(path, b)
            if not os.path.isfile(file):
                raise DataError(f"missing CIFAR-10 batch {file}")
            try:
                with open(file, "rb") as f:
                    found[b] = (f.read(), file)
            except OSError as e:
                raise DataError(f"cannot read {file}: {e}") from None
        return found
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if member.isfile() and base in _CIFAR_PY_BATCHES and base not in found:
                    found[base] = (tf.extractfile(member).read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read archive {path}: corrupt or truncated ({e})") from None
    for b in _CIFAR_PY_BATCHES:
        if b not in found:
            raise DataError(f"missing member {_CIFAR_PY_DIR}/{b} in archive {path}")
    return found


def _load_cifar_python(spec: DatasetSpec, path: str) -> Dataset:
    """Load CIFAR-10 from ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``."""
    batches = _read_cifar_batches(path)
    parsed = {b: _parse_cifar_batch(raw, spec.num_classes, where) for b, (raw, where) in batches.items()}
    train_x = np.concatenate([parsed[b][0] for b in _CIFAR_PY_TRAIN])
    train_y = np.concatenate([parsed[b][1] for b in _CIFAR_PY_TRAIN])
    test_x, test_y = parsed[_CIFAR_PY_TEST]
    return Dataset(spec, train_x, train_y, test_x, test_y)
