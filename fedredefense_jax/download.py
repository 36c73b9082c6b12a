"""Download of the official dataset files into the local cache.

:func:`fetch` puts the official files of a dataset in
``<cache_dir>/<dataset>/`` under their official names, the way torchvision
and Keras do:

* Fashion-MNIST: the four gzipped IDX files from the authors' mirror.
* CIFAR-10: the "python version" archive ``cifar-10-python.tar.gz``
  (a tar.gz of ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` pickles).

Each missing file is streamed with :mod:`urllib` into a temporary file in the
same directory, its size and md5 are checked, and only then is it renamed to
its final name (``os.replace``): an interrupted, truncated or corrupt
download leaves nothing under the final name.  A file already in the cache
whose size and md5 match is not downloaded again.  Progress goes to absl
logging (every 10 % or every few seconds).

The base URL can be replaced by ``$FEDREDEFENSE_MIRROR`` (any URL that
``urllib`` opens, e.g. ``http://host/datasets/`` or ``file:///srv/mirror/``,
holding the files under their official names) or by the ``base_url``
argument; the file table (names, md5s, sizes) by the ``sources`` argument.

Every failure raises :class:`~fedredefense_jax.data.DataError` with a
one-line message; without network it names the files to fetch, where from,
and the directory to put them in (or to pass ``--data_dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from typing import Sequence

from absl import logging

from fedredefense_jax.data import DataError, default_cache_dir

__all__ = ["Source", "SOURCES", "BASE_URLS", "MIRROR_ENV", "fetch", "dataset_dir"]

MIRROR_ENV = "FEDREDEFENSE_MIRROR"


@dataclasses.dataclass(frozen=True)
class Source:
    """One official file.

    Attributes:
      filename: name on the server and in the cache directory.
      md5: lowercase hex md5 of the whole file.
      size: size in bytes, or None when unknown (then only the md5 is checked).
    """

    filename: str
    md5: str
    size: int | None = None


# Fashion-MNIST: names and md5s as in torchvision's ``FashionMNIST.resources``
# (torchvision/datasets/mnist.py) and the dataset's README
# (https://github.com/zalandoresearch/fashion-mnist); sizes as in TFDS's
# checksum list and Keras' download logs.  The two label files of the offline
# copy used by this project's tests are the official ones and match these md5s.
# CIFAR-10: md5 as in torchvision's ``CIFAR10.tgz_md5`` (torchvision/datasets/
# cifar.py); size as served by www.cs.toronto.edu.
SOURCES: dict[str, tuple[Source, ...]] = {
    "fashion_mnist": (
        Source("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
        Source("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 29515),
        Source("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 4422102),
        Source("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 5148),
    ),
    "cifar10": (
        Source("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071),
    ),
}

BASE_URLS: dict[str, str] = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}

_CHUNK = 1 << 20
_PROGRESS_SECONDS = 5.0
_TIMEOUT_SECONDS = 30.0


def dataset_dir(dataset: str, cache_dir: str | None = None) -> str:
    """``<cache_dir>/<dataset>``; cache_dir defaults to ``data.default_cache_dir()``."""
    root = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    return os.path.join(root, dataset)


def fetch(
    dataset: str,
    cache_dir: str | None = None,
    base_url: str | None = None,
    sources: Sequence[Source] | None = None,
    timeout: float = _TIMEOUT_SECONDS,
) -> str:
    """Make sure the official files of ``dataset`` are in the cache.

    Args:
      dataset: a key of :data:`SOURCES` ('fashion_mnist', 'cifar10').
      cache_dir: cache root; files go to ``<cache_dir>/<dataset>/``.  Default
        ``$FEDREDEFENSE_CACHE`` or ``~/.cache/fedredefense_jax``.
      base_url: URL prefix of the files (official name appended); default
        ``$FEDREDEFENSE_MIRROR``, else the official mirror in :data:`BASE_URLS`.
      sources: files to get, default ``SOURCES[dataset]``.
      timeout: socket timeout in seconds for connecting and each read.
    Returns:
      the directory ``<cache_dir>/<dataset>`` holding every verified file.
    Raises:
      DataError: unknown dataset, no network, HTTP error, truncated or
        corrupt download, or an unwritable cache directory.
    """
    if dataset not in SOURCES and sources is None:
        raise DataError(
            f"no download for dataset {dataset!r} (downloadable: {', '.join(sorted(SOURCES))}); "
            "pass --data_dir"
        )
    files = tuple(sources) if sources is not None else SOURCES[dataset]
    base = _base_url(dataset, base_url)
    directory = dataset_dir(dataset, cache_dir)
    missing = [src for src in files if not _is_verified(os.path.join(directory, src.filename), src)]
    if not missing:
        return directory
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache directory {directory}: {e}") from None
    for i, src in enumerate(missing):
        url = base + src.filename
        try:
            response = _open(url, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if isinstance(e, urllib.error.HTTPError):
                e.close()
            raise _manual_fetch_error(dataset, missing[i:], base, directory, e) from None
        with response:
            _save(response, url, os.path.join(directory, src.filename), src)
    return directory


def _base_url(dataset: str, base_url: str | None) -> str:
    """The URL prefix in force, ending with '/'."""
    base = base_url or os.environ.get(MIRROR_ENV) or BASE_URLS.get(dataset)
    if not base:
        raise DataError(f"no base URL for dataset {dataset!r}: pass base_url or set ${MIRROR_ENV}")
    return base if base.endswith("/") else base + "/"


def _md5_of(path: str) -> str:
    """Hex md5 of the file at path."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _is_verified(path: str, src: Source) -> bool:
    """True if ``path`` exists with the size and md5 of ``src``.

    A file that exists but does not match is logged and left for
    replacement by a fresh download.
    """
    if not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    if src.size is not None and size != src.size:
        logging.warning("%s has %d bytes, expected %d: downloading it again", path, size, src.size)
        return False
    try:
        md5 = _md5_of(path)
    except OSError as e:
        logging.warning("cannot read %s (%s): downloading it again", path, e)
        return False
    if md5 != src.md5:
        logging.warning("%s has md5 %s, expected %s: downloading it again", path, md5, src.md5)
        return False
    return True


def _open(url: str, timeout: float):
    """Open ``url`` for reading (raises urllib/http/socket errors as they come)."""
    request = urllib.request.Request(url, headers={"User-Agent": "fedredefense-jax"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https/file)


def _manual_fetch_error(
    dataset: str, missing: Sequence[Source], base: str, directory: str, err: BaseException
) -> DataError:
    """One-line DataError: the reason, then the files to fetch, from where, to where."""
    if isinstance(err, urllib.error.HTTPError):
        reason = f"HTTP {err.code} {err.reason} for {err.url}"
    elif isinstance(err, urllib.error.URLError):
        reason = f"{type(err.reason).__name__}: {err.reason}"
    else:
        reason = f"{type(err).__name__}: {err}"
    names = ", ".join(src.filename for src in missing)
    if len(missing) > 1:
        data_dir = "--data_dir=<the directory holding them>"
    else:
        data_dir = f"--data_dir=<path of {missing[0].filename}>"
    return DataError(
        _one_line(
            f"cannot download {dataset} ({reason}): fetch {names} from {base} "
            f"into {directory}{os.sep}, or pass {data_dir}"
        )
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _save(response, url: str, dest: str, src: Source) -> None:
    """Stream ``response`` into ``dest`` atomically, checking size and md5.

    Writes ``.<name>.*.part`` next to ``dest``, renames it to ``dest`` only
    when complete and verified, and removes it on any failure.
    """
    directory, name = os.path.split(dest)
    total = _content_length(response) or src.size
    logging.info("Downloading %s to %s%s", url, dest, f" ({total / 1e6:.1f} MB)" if total else "")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    except OSError as e:
        raise DataError(f"cannot write to cache directory {directory}: {e}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            received, md5 = _stream(response, out, url, name, total)
        expected_len = _content_length(response)
        if expected_len is not None and received != expected_len:
            raise DataError(
                f"truncated download of {name} from {url}: got {received} of {expected_len} bytes "
                "(connection closed early); nothing was saved, run again to retry"
            )
        if src.size is not None and received != src.size:
            raise DataError(
                f"wrong size for {name} from {url}: {received} bytes, expected {src.size}; "
                "nothing was saved"
            )
        if md5 != src.md5:
            raise DataError(
                f"checksum mismatch for {name} from {url}: md5 {md5}, expected {src.md5}; "
                "nothing was saved"
            )
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    logging.info("Saved %s (%d bytes, md5 verified)", dest, received)


def _content_length(response) -> int | None:
    """The Content-Length header as an int, or None if absent or malformed."""
    value = response.headers.get("Content-Length") if response.headers else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream(response, out, url: str, name: str, total: int | None) -> tuple[int, str]:
    """Copy the body to ``out``; return (bytes received, hex md5).

    Logs progress every 10 % of ``total`` or every few seconds.
    """
    h = hashlib.md5(usedforsecurity=False)
    received = 0
    next_pct = 10
    last_log = time.monotonic()
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (http.client.HTTPException, OSError) as e:
            raise DataError(
                _one_line(
                    f"truncated download of {name} from {url} after {received} bytes "
                    f"({type(e).__name__}: {e}); nothing was saved, run again to retry"
                )
            ) from None
        if not chunk:
            return received, h.hexdigest()
        try:
            out.write(chunk)
        except OSError as e:
            raise DataError(f"cannot write {name} to the cache: {e}") from None
        h.update(chunk)
        received += len(chunk)
        now = time.monotonic()
        pct = 100 * received // total if total else None
        if (pct is not None and pct >= next_pct) or now - last_log >= _PROGRESS_SECONDS:
            of_total = f" of {total / 1e6:.1f} MB ({pct}%)" if total else " MB"
            logging.info("%s: %.1f%s", name, received / 1e6, of_total)
            last_log = now
            if pct is not None:
                next_pct = (pct // 10 + 1) * 10
