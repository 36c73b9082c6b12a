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
   lazily so that importing this module never imports TensorFlow.

Every problem with the input data raises :class:`DataError` with a one-line
message naming the file or directory at fault.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import warnings
import zlib
from typing import Iterator

import numpy as np

__all__ = [
    "DatasetSpec",
    "SPECS",
    "Dataset",
    "DataError",
    "load_dataset",
    "normalize",
]


# ---------------------------------------------------------------------------
# Static dataset facts
# ---------------------------------------------------------------------------


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

# Splits read from an image-folder tree: (required, optional).
_TREE_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fashion_mnist": (("train", "test"), ()),
    "cifar10": (("train", "test"), ()),
    "cinic10": (("train", "test"), ("valid",)),
}

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")

# Official Fashion-MNIST file stems: (images, labels) per split.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

# CIFAR-10 "python version": pickled batches inside cifar-10-batches-py/.
_CIFAR_PY_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_PY_DIR = "cifar-10-batches-py"
_CIFAR_PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_PY_TEST = "test_batch"
_CIFAR_PY_BATCHES = _CIFAR_PY_TRAIN + (_CIFAR_PY_TEST,)

# Set to "1" to load fashion_mnist / cifar10 through TFDS when data_dir is None.
_TFDS_ENV = "FEDREDEFENSE_TFDS"

_FMNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CINIC_URL = "https://datashare.ed.ac.uk/handle/10283/3192"

# Bump when the cache file layout or decoding changes.
_CACHE_VERSION = "1"


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


# ---------------------------------------------------------------------------
# Source 1: Fashion-MNIST IDX files
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Source 2: image-folder tree (directory or tar archive)
# ---------------------------------------------------------------------------


def _all_splits(spec: DatasetSpec) -> tuple[str, ...]:
    required, optional = _TREE_SPLITS[spec.name]
    return required + optional


def _has_splits(path: str) -> bool:
    """True if directory ``path`` has a ``train`` or ``test`` subfolder."""
    return any(os.path.isdir(os.path.join(path, s)) for s in ("train", "test"))


def _single_subdir_with_splits(path: str) -> bool:
    """True if ``path`` holds exactly one visible folder, which has splits."""
    subdirs = [
        e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")
    ]
    return len(subdirs) == 1 and _has_splits(subdirs[0])


def _is_image_name(relpath: str) -> bool:
    """True for a visible ``*.png|jpg|jpeg`` file name (case-insensitive)."""
    base = relpath.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(_IMAGE_EXTS)


def _iter_dir_tree(root: str) -> Iterator[tuple[str, str, bytes | None]]:
    """Walk a directory tree.

    Yields ``(kind, relpath, data)``: kind 'dir' (data None) or 'file'
    (data = file bytes, read only for image files), relpath '/'-separated.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        for d in dirnames:
            yield "dir", rel_dir + d, None
        for fname in sorted(filenames):
            rel = rel_dir + fname
            if not _is_image_name(rel):
                continue
            try:
                with open(os.path.join(dirpath, fname), "rb") as f:
                    data = f.read()
            except OSError as e:
                raise DataError(f"cannot read {os.path.join(dirpath, fname)}: {e}") from None
            yield "file", rel, data


def _iter_tar(path: str) -> Iterator[tuple[str, str, bytes | None]]:
    """Stream a tar archive (any compression) without extracting to disk.

    Yields ``(kind, relpath, data)`` like :func:`_iter_dir_tree`.
    """
    try:
        with tarfile.open(path, mode="r|*") as tf:
            while True:
                member = tf.next()
                if member is None:
                    break
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                name = name.strip("/")
                if member.isdir():
                    yield "dir", name, None
                elif member.isfile() and _is_image_name(name):
                    fobj = tf.extractfile(member)
                    yield "file", name, fobj.read()
                # Streaming mode keeps every TarInfo; drop them to bound memory.
                tf.members.clear()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read archive {path}: corrupt or truncated ({e})") from None


def _decode_image(data: bytes, shape: tuple, where: str) -> bytes:
    """Decode one PNG/JPEG to raw pixels.

    Args:
      data: encoded image bytes.
      shape: expected ``(H, W, C)``; C=1 gives grayscale, C=3 gives RGB.
      where: file name (``archive:member`` for archives) for error messages.
    Returns:
      ``H*W*C`` bytes in row-major HWC order.
    """
    from PIL import Image  # noqa: PLC0415 (keep Pillow off the import path)

    h, w, c = shape
    try:
        im = Image.open(io.BytesIO(data))
        if im.size != (w, h):
            raise DataError(
                f"image {where} is {im.size[0]}x{im.size[1]} (WxH), expected {w}x{h}"
            )
        mode = "L" if c == 1 else "RGB"
        if im.mode != mode:
            im = im.convert(mode)
        raw = im.tobytes()
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types on bad data.
        raise DataError(f"cannot decode image {where}: {type(e).__name__}: {e}") from None
    if len(raw) != h * w * c:
        raise DataError(f"cannot decode image {where}: got {len(raw)} bytes of pixels")
    return raw


@dataclasses.dataclass
class _SplitBuffer:
    """Decoded pixels of one split, in archive order, before sorting."""

    pixels: bytearray = dataclasses.field(default_factory=bytearray)
    keys: list = dataclasses.field(default_factory=list)  # (label, filename)


def _strip_prefix(relpath: str, prefix: str) -> str | None:
    """relpath without ``prefix`` ('' or 'top/'); None if it lies outside."""
    if not prefix:
        return relpath
    return relpath[len(prefix):] if relpath.startswith(prefix) else None


def _decode_tree(
    spec: DatasetSpec, entries: Iterator[tuple[str, str, bytes | None]], label: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode an image-folder tree given as a stream of entries.

    The tree is ``<split>/<class>/<file>``, possibly under one top-level
    folder (detected from the first image's path).

    Args:
      spec: dataset spec (classes, image shape, splits).
      entries: ``(kind, relpath, data)`` from :func:`_iter_dir_tree` or
        :func:`_iter_tar`.
      label: the directory/archive path, used in error messages.
    Returns:
      ``{split: (uint8 [N, H, W, C], int32 [N])}``, sorted by class then name.
    """
    splits = _all_splits(spec)
    class_index = {c: i for i, c in enumerate(spec.classes)}
    buffers: dict[str, _SplitBuffer] = {}
    dirs: set[str] = set()
    prefix: str | None = None
    sep = ":" if os.path.isfile(label) else "/"

    for kind, relpath, data in entries:
        if kind == "dir":
            dirs.add(relpath)
            continue
        if prefix is None:
            prefix = _detect_prefix(relpath, splits)
            if prefix is None:
                raise DataError(
                    f"image {label}{sep}{relpath} is not under a "
                    f"{'/|'.join(splits)}/<class>/ folder"
                )
        rel = _strip_prefix(relpath, prefix)
        parts = rel.split("/") if rel is not None else []
        if len(parts) != 3:
            raise DataError(
                f"image {label}{sep}{relpath} is not at <split>/<class>/<file> "
                f"(splits: {', '.join(splits)})"
            )
        split, cls, fname = parts
        if split not in splits:
            raise DataError(
                f"unexpected split folder {label}{sep}{prefix}{split} for "
                f"{spec.name}; expected {', '.join(splits)}"
            )
        if cls not in class_index:
            raise DataError(
                f"unknown class folder {label}{sep}{prefix}{split}/{cls} for "
                f"{spec.name}; expected one of {', '.join(spec.classes)}"
            )
        raw = _decode_image(data, spec.input_shape, f"{label}{sep}{relpath}")
        buf = buffers.setdefault(split, _SplitBuffer())
        buf.pixels += raw
        buf.keys.append((class_index[cls], fname))

    prefix = prefix or ""
    _check_tree_complete(spec, buffers, dirs, prefix, label, sep)
    return {split: _finalize_split(spec, buf) for split, buf in buffers.items()}


def _detect_prefix(relpath: str, splits: tuple[str, ...]) -> str | None:
    """'' if relpath starts with a split folder, 'top/' if its second part
    does, else None."""
    parts = relpath.split("/")
    if parts[0] in splits:
        return ""
    if len(parts) > 1 and parts[1] in splits:
        return parts[0] + "/"
    return None


def _check_tree_complete(
    spec: DatasetSpec,
    buffers: dict[str, _SplitBuffer],
    dirs: set[str],
    prefix: str,
    label: str,
    sep: str,
) -> None:
    """Raise DataError for a missing required split, or a missing/empty class."""
    required, _ = _TREE_SPLITS[spec.name]
    for split in required:
        if split not in buffers:
            raise DataError(f"missing split folder {label}{sep}{prefix}{split}/ (no images)")
    for split, buf in buffers.items():
        present = {lbl for lbl, _ in buf.keys}
        for i, cls in enumerate(spec.classes):
            if i in present:
                continue
            where = f"{label}{sep}{prefix}{split}/{cls}"
            if f"{prefix}{split}/{cls}" in dirs:
                raise DataError(f"empty class folder {where} (no .png/.jpg/.jpeg images)")
            raise DataError(f"missing class folder {where}")


def _finalize_split(spec: DatasetSpec, buf: _SplitBuffer) -> tuple[np.ndarray, np.ndarray]:
    """Order one split by (label, filename).

    Returns:
      (``uint8 [N, H, W, C]``, ``int32 [N]``).
    """
    n = len(buf.keys)
    x = np.frombuffer(buf.pixels, dtype=np.uint8).reshape((n,) + tuple(spec.input_shape))
    order = sorted(range(n), key=buf.keys.__getitem__)
    order_arr = np.asarray(order, dtype=np.int64)
    y = np.asarray([buf.keys[i][0] for i in order], dtype=np.int32)
    return np.ascontiguousarray(x[order_arr]), y


def _load_tree(spec: DatasetSpec, path: str) -> Dataset:
    """Decode an image-folder tree from a directory or tar archive at ``path``."""
    entries = _iter_tar(path) if os.path.isfile(path) else _iter_dir_tree(path)
    splits = _decode_tree(spec, entries, path)
    valid = splits.get("valid", (None, None))
    return Dataset(
        spec,
        splits["train"][0], splits["train"][1],
        splits["test"][0], splits["test"][1],
        valid[0], valid[1],
    )


# ---------------------------------------------------------------------------
# Source 3: CIFAR-10 "python version" (pickled batches)
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Cache of decoded image-folder data
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Source 4: no data_dir (download into the cache, or TensorFlow Datasets)
# ---------------------------------------------------------------------------


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
    from fedredefense_jax import download  # noqa: PLC0415 (download imports this module)

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
