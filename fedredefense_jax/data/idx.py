"""Fashion-MNIST from the four official IDX files (gzipped or not), parsed with numpy."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from fedredefense_jax.data.specs import _FMNIST_URL, DataError, Dataset, DatasetSpec

# Official Fashion-MNIST file stems: (images, labels) per split.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def _has_idx_files(data_dir: str) -> bool:
    """True if data_dir holds any official Fashion-MNIST IDX file."""
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    return any(
        os.path.isfile(os.path.join(data_dir, stem + ext)) for stem in stems for ext in (".gz", "")
    )


def _find_idx_file(data_dir: str, stem: str) -> str:
    """Path of ``stem.gz`` or ``stem`` inside data_dir; DataError if neither."""
    for candidate in (stem + ".gz", stem):
        p = os.path.join(data_dir, candidate)
        if os.path.isfile(p):
            return p
    raise DataError(
        f"missing Fashion-MNIST file {os.path.join(data_dir, stem + '.gz')} "
        f"(or un-gzipped {stem}); get the four IDX files from {_FMNIST_URL}"
    )


def _read_maybe_gzip(path: str) -> bytes:
    """Whole content of ``path``, gunzipped when it ends in ``.gz``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read {path}: corrupt or truncated file ({e})") from None


def parse_idx(raw: bytes, expected_magic: int, where: str) -> np.ndarray:
    """Parse an unsigned-byte IDX blob.

    Args:
      raw: file content; header is a big-endian int32 magic
        (``0x0000 08 ndim``) followed by ``ndim`` big-endian int32 dims.
      expected_magic: 2051 for images (ndim 3), 2049 for labels (ndim 1).
      where: file name used in error messages.
    Returns:
      ``uint8`` array of shape given by the header dims.
    """
    if len(raw) < 4:
        raise DataError(f"{where}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{where}: bad IDX magic number {magic}, expected {expected_magic}"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{where}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(
        int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{where}: IDX size mismatch, header dims {dims} need {expected} "
            f"bytes but file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _load_idx_split(spec: DatasetSpec, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one Fashion-MNIST split: (``uint8 [N, 28, 28, 1]``, ``int32 [N]``)."""
    img_stem, lbl_stem = _IDX_FILES[split]
    img_path = _find_idx_file(data_dir, img_stem)
    lbl_path = _find_idx_file(data_dir, lbl_stem)
    images = parse_idx(_read_maybe_gzip(img_path), _IDX_IMAGES_MAGIC, img_path)
    labels = parse_idx(_read_maybe_gzip(lbl_path), _IDX_LABELS_MAGIC, lbl_path)
    h, w, c = spec.input_shape
    if images.shape[1:] != (h, w):
        raise DataError(
            f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected {h}x{w}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"image/label count mismatch: {img_path} has {images.shape[0]} images "
            f"but {lbl_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise DataError(
            f"{lbl_path}: label {int(labels.max())} out of range [0, {spec.num_classes})"
        )
    x = np.ascontiguousarray(images.reshape(-1, h, w, c))
    return x, labels.astype(np.int32)


def _load_idx_dir(spec: DatasetSpec, data_dir: str) -> Dataset:
    """Load Fashion-MNIST from a directory of the four official IDX files."""
    train_x, train_y = _load_idx_split(spec, data_dir, "train")
    test_x, test_y = _load_idx_split(spec, data_dir, "test")
    return Dataset(spec, train_x, train_y, test_x, test_y)
