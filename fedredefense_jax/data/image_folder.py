"""Image-folder trees ``<split>/<class>/*.{png,jpg,jpeg}``, as a directory or a tar archive.

The tree may lie below a single top-level folder.  Archives (``.tar.gz`` /
``.tgz`` / ``.tar``) are streamed, never extracted to disk.  Images are
decoded with Pillow, imported only when an image is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import zlib
from typing import Iterator

import numpy as np

from fedredefense_jax.data.specs import DataError, Dataset, DatasetSpec

# Splits read from an image-folder tree: (required, optional).
_TREE_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fashion_mnist": (("train", "test"), ()),
    "cifar10": (("train", "test"), ()),
    "cinic10": (("train", "test"), ("valid",)),
}

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


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
