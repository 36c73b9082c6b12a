"""Tests for fedredefense_jax.download and CIFAR-10's python format (local HTTP server, no internet)."""

from __future__ import annotations

import collections
import hashlib
import http.server
import io
import logging
import os
import pickle
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from fedredefense_jax import data, download
from fedredefense_jax.data import DataError, load_dataset
from fedredefense_jax.download import Source

FMNIST_FILES = [s.filename for s in download.SOURCES["fashion_mnist"]]
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


# ---------------------------------------------------------------------------
# Local HTTP server
# ---------------------------------------------------------------------------


class ServerState:
    """Files served by the local server, how to serve them, and request counts.

    ``modes[name]``: 'short' sends half the body with the full Content-Length,
    'no_length' sends half the body without Content-Length.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: collections.Counter = collections.Counter()
        self.url = ""

    def add(self, name: str, body: bytes) -> Source:
        """Serve ``body`` as ``name``; return its Source (md5 and size of body)."""
        self.files[name] = body
        return Source(name, hashlib.md5(body).hexdigest(), len(body))


@pytest.fixture
def server(request):
    state = ServerState()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            name = self.path.lstrip("/")
            state.requests[name] += 1
            body = state.files.get(name)
            if body is None:
                self.send_error(404)
                return
            mode = state.modes.get(name)
            self.send_response(200)
            if mode != "no_length":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if mode else body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)

    request.addfinalizer(stop)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    return state


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def cache_files(directory) -> list[str]:
    """All entries of a cache directory (hidden temp files included); [] if absent."""
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ---------------------------------------------------------------------------
# Tiny CIFAR-10 python archive
# ---------------------------------------------------------------------------


def cifar_batch(x: np.ndarray, y, name: str, **overrides) -> bytes:
    """A batch pickle in the official layout: ``uint8 [n, 3072]`` CHW-planar rows."""
    d = {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in y],
        b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }
    d.update(overrides)
    return pickle.dumps(d, protocol=2)


def make_cifar_members(per_batch=4, n_test=10, seed=0):
    """Members {name: bytes} of a tiny archive (20 train, 10 test) and the expected arrays."""
    rng = np.random.default_rng(seed)
    members = {"cifar-10-batches-py/readme.html": b"<html>CIFAR-10</html>",
               "cifar-10-batches-py/batches.meta": pickle.dumps({b"num_cases_per_batch": per_batch})}
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        members[f"cifar-10-batches-py/data_batch_{i}"] = cifar_batch(x, y, f"training batch {i} of 5")
        train_x.append(x)
        train_y.append(y)
    tx = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    ty = rng.integers(0, 10, n_test)
    members["cifar-10-batches-py/test_batch"] = cifar_batch(tx, ty, "testing batch 1 of 1")
    expected = (np.concatenate(train_x), np.concatenate(train_y).astype(np.int32), tx, ty.astype(np.int32))
    return members, expected


# Archive order as in the official file: not numeric, so concatenation order is exercised.
_ORDER = ["readme.html", "data_batch_4", "test_batch", "data_batch_3", "batches.meta",
          "data_batch_2", "data_batch_5", "data_batch_1"]


def cifar_archive_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        top = tarfile.TarInfo("cifar-10-batches-py")
        top.type = tarfile.DIRTYPE
        tf.addfile(top)
        names = sorted(members, key=lambda n: _ORDER.index(n.rsplit("/", 1)[-1])
                       if n.rsplit("/", 1)[-1] in _ORDER else len(_ORDER))
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


def assert_cifar(ds: data.Dataset, expected):
    train_x, train_y, test_x, test_y = expected
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape == (20, 32, 32, 3)
    assert ds.train_y.dtype == np.int32 and ds.test_x.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_x, train_x)
    np.testing.assert_array_equal(ds.train_y, train_y)
    np.testing.assert_array_equal(ds.test_x, test_x)
    np.testing.assert_array_equal(ds.test_y, test_y)
    assert ds.valid_x is None and ds.spec is data.SPECS["cifar10"]


# ---------------------------------------------------------------------------
# Source table
# ---------------------------------------------------------------------------


def test_official_table():
    assert download.BASE_URLS["fashion_mnist"] == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert download.BASE_URLS["cifar10"] == "https://www.cs.toronto.edu/~kriz/"
    md5 = {s.filename: s.md5 for srcs in download.SOURCES.values() for s in srcs}
    assert md5 == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    }
    assert "cinic10" not in download.SOURCES


def test_shared_label_files_match_official_md5(shared_data):
    # The offline copy's label files are the official ones (its image files were rebuilt).
    for src in download.SOURCES["fashion_mnist"]:
        if "labels" in src.filename:
            path = os.path.join(shared_data, "fashion_mnist", src.filename)
            assert download._md5_of(path) == src.md5 and os.path.getsize(path) == src.size


# ---------------------------------------------------------------------------
# Downloads through load_dataset
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_bytes(shared_data):
    root = os.path.join(shared_data, "fashion_mnist")
    if not os.path.isdir(root):
        pytest.skip(f"{root} not found")
    out = {}
    for name in FMNIST_FILES:
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return root, out


def test_fashion_mnist_download_then_cache(server, fmnist_bytes, tmp_path, monkeypatch, caplog):
    root, files = fmnist_bytes
    sources = tuple(server.add(name, body) for name, body in files.items())
    monkeypatch.setitem(download.SOURCES, "fashion_mnist", sources)
    monkeypatch.setenv("FEDREDEFENSE_MIRROR", server.url)
    caplog.set_level(logging.INFO, logger="absl")
    cache = tmp_path / "cache"

    ds = load_dataset("fashion_mnist", cache_dir=str(cache))
    direct = load_dataset("fashion_mnist", data_dir=root)
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(ds, f), getattr(direct, f), err_msg=f)
    assert ds.train_x.shape == (60000, 28, 28, 1)
    assert server.requests == {name: 1 for name in FMNIST_FILES}
    assert cache_files(cache / "fashion_mnist") == sorted(FMNIST_FILES)  # no temp files left
    assert f"Downloading {server.url}train-images-idx3-ubyte.gz" in caplog.text
    assert "(100%)" in caplog.text and "md5 verified" in caplog.text

    again = load_dataset("fashion_mnist", cache_dir=str(cache))
    assert server.requests == {name: 1 for name in FMNIST_FILES}  # verified files: no download
    np.testing.assert_array_equal(again.test_x, ds.test_x)


def test_cifar10_download_then_cache(server, tmp_path, monkeypatch):
    members, expected = make_cifar_members()
    src = server.add(CIFAR_ARCHIVE, cifar_archive_bytes(members))
    monkeypatch.setitem(download.SOURCES, "cifar10", (src,))
    monkeypatch.setenv("FEDREDEFENSE_CACHE", str(tmp_path / "envcache"))
    download_dir = download.fetch("cifar10", base_url=server.url)
    assert download_dir == str(tmp_path / "envcache" / "cifar10")
    assert cache_files(download_dir) == [CIFAR_ARCHIVE]

    monkeypatch.setenv("FEDREDEFENSE_MIRROR", server.url)
    assert_cifar(load_dataset("cifar10"), expected)
    assert server.requests[CIFAR_ARCHIVE] == 1


def test_bad_cached_file_is_replaced(server, tmp_path):
    src = server.add("f.bin", b"good bytes" * 100)
    d = tmp_path / "c" / "toy"
    d.mkdir(parents=True)
    (d / "f.bin").write_bytes(b"stale" * 200)  # same size, wrong md5
    download.fetch("toy", str(tmp_path / "c"), base_url=server.url, sources=[src])
    assert (d / "f.bin").read_bytes() == server.files["f.bin"]
    download.fetch("toy", str(tmp_path / "c"), base_url=server.url, sources=[src])
    assert server.requests["f.bin"] == 1


# ---------------------------------------------------------------------------
# Failed downloads leave nothing behind
# ---------------------------------------------------------------------------


def test_checksum_mismatch(server, tmp_path):
    body = b"not the official file" * 50
    server.files["train-images-idx3-ubyte.gz"] = body
    bad = Source("train-images-idx3-ubyte.gz", "0" * 32, len(body))
    with pytest.raises(DataError) as e:
        download.fetch("fashion_mnist", str(tmp_path), base_url=server.url, sources=[bad])
    msg = one_line(e)
    assert "checksum mismatch" in msg and f"{server.url}train-images-idx3-ubyte.gz" in msg
    assert hashlib.md5(body).hexdigest() in msg
    assert cache_files(tmp_path / "fashion_mnist") == []


@pytest.mark.parametrize("mode", ["short", "no_length"])
def test_truncated_download(server, tmp_path, mode):
    good = server.add("cifar-10-python.tar.gz", bytes(range(256)) * 400)
    server.modes["cifar-10-python.tar.gz"] = mode
    with pytest.raises(DataError) as e:
        download.fetch("cifar10", str(tmp_path), base_url=server.url, sources=[good])
    msg = one_line(e)
    assert f"{server.url}cifar-10-python.tar.gz" in msg
    assert ("truncated" if mode == "short" else "wrong size") in msg
    assert cache_files(tmp_path / "cifar10") == []


def test_partial_failure_keeps_verified_files(server, tmp_path):
    first = server.add("a.gz", b"a" * 1000)
    second = Source("b.gz", "0" * 32)
    server.files["b.gz"] = b"b" * 1000
    with pytest.raises(DataError, match="b.gz"):
        download.fetch("toy", str(tmp_path), base_url=server.url, sources=[first, second])
    assert cache_files(tmp_path / "toy") == ["a.gz"]


def test_offline_error_names_files_and_directory(closed_port_url, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREDEFENSE_MIRROR", closed_port_url)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", cache_dir=str(tmp_path / "cache"))
    assert time.perf_counter() - t0 < 10
    msg = one_line(e)
    for name in FMNIST_FILES:
        assert name in msg
    assert closed_port_url in msg and "Connection" in msg
    assert os.path.join(str(tmp_path / "cache"), "fashion_mnist") in msg and "--data_dir" in msg
    assert cache_files(tmp_path / "cache" / "fashion_mnist") == []

    with pytest.raises(DataError) as e:
        download.fetch("cifar10", str(tmp_path / "cache"), base_url=closed_port_url)
    msg = one_line(e)
    assert "cifar-10-python.tar.gz" in msg and "--data_dir=<path of cifar-10-python.tar.gz>" in msg
    assert os.path.join(str(tmp_path / "cache"), "cifar10") in msg


def test_offline_lists_only_files_still_missing(server, closed_port_url, tmp_path):
    a = server.add("a.gz", b"a" * 10)
    b = server.add("b.gz", b"b" * 10)
    download.fetch("toy", str(tmp_path), base_url=server.url, sources=[a])
    with pytest.raises(DataError) as e:
        download.fetch("toy", str(tmp_path), base_url=closed_port_url, sources=[a, b])
    msg = one_line(e)
    assert "fetch b.gz from" in msg and "a.gz" not in msg


def test_file_url_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    body = b"mirrored" * 100
    (mirror / "m.gz").write_bytes(body)
    monkeypatch.setenv("FEDREDEFENSE_MIRROR", mirror.as_uri())  # no trailing slash
    src = Source("m.gz", hashlib.md5(body).hexdigest(), len(body))
    d = download.fetch("toy", str(tmp_path / "c"), sources=[src])
    with open(os.path.join(d, "m.gz"), "rb") as f:
        assert f.read() == body


def test_http_error(server, tmp_path):
    with pytest.raises(DataError) as e:
        download.fetch("toy", str(tmp_path), base_url=server.url, sources=[Source("gone.gz", "0" * 32)])
    msg = one_line(e)
    assert "HTTP 404" in msg and f"{server.url}gone.gz" in msg and "gone.gz" in msg


def test_cinic10_has_no_download():
    with pytest.raises(DataError) as e:
        load_dataset("cinic10")
    msg = one_line(e)
    assert "--data_dir" in msg and "CINIC-10.tar.gz" in msg


# ---------------------------------------------------------------------------
# CIFAR-10 python format given as data_dir
# ---------------------------------------------------------------------------


@pytest.fixture
def cifar_py(tmp_path):
    members, expected = make_cifar_members(seed=1)
    archive = tmp_path / "dl" / CIFAR_ARCHIVE
    archive.parent.mkdir()
    archive.write_bytes(cifar_archive_bytes(members))
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "extracted", filter="data")
    return archive, tmp_path / "extracted", expected


def test_cifar_python_data_dir_forms(cifar_py, tmp_path):
    archive, extracted, expected = cifar_py
    for path in (archive, archive.parent, extracted, extracted / "cifar-10-batches-py"):
        assert_cifar(load_dataset("cifar10", data_dir=str(path), cache_dir=str(tmp_path / "c")), expected)
    assert not (tmp_path / "c").exists()  # read directly, no .npz cache


def _archive_with(tmp_path, member: str, raw: bytes, drop: str | None = None):
    members, _ = make_cifar_members()
    members[f"cifar-10-batches-py/{member}"] = raw
    if drop:
        del members[f"cifar-10-batches-py/{drop}"]
    path = tmp_path / "bad-cifar.tar.gz"
    path.write_bytes(cifar_archive_bytes(members))
    return path


def test_cifar_python_wrong_shape(tmp_path):
    raw = pickle.dumps({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, protocol=2)
    path = _archive_with(tmp_path, "data_batch_3", raw)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(path))
    msg = one_line(e)
    assert f"{path}:cifar-10-batches-py/data_batch_3" in msg and "(4, 3071)" in msg


@pytest.mark.parametrize("raw, expect", [
    (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}), "3 labels for 4 images"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "label 10 out of range"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "float32"),
    (pickle.dumps({b"labels": [0, 1]}), "no 'data' entry"),
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (b"garbage", "not a CIFAR-10 batch pickle"),
])
def test_cifar_python_bad_batch(tmp_path, raw, expect):
    path = _archive_with(tmp_path, "test_batch", raw)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(path))
    msg = one_line(e)
    assert "cifar-10-batches-py/test_batch" in msg and expect in msg


class _Hostile:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_python_refuses_other_globals(tmp_path):
    raw = pickle.dumps({b"data": _Hostile(), b"labels": []})
    path = _archive_with(tmp_path, "data_batch_1", raw)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(path))
    msg = one_line(e)
    assert "data_batch_1" in msg and "getcwd is not allowed" in msg


def test_cifar_python_missing_member(tmp_path):
    members, _ = make_cifar_members()
    path = _archive_with(tmp_path, "data_batch_1", members["cifar-10-batches-py/data_batch_1"],
                         drop="data_batch_5")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(path))
    msg = one_line(e)
    assert "cifar-10-batches-py/data_batch_5" in msg and str(path) in msg


def test_cifar_python_missing_file_in_dir(cifar_py):
    _, extracted, _ = cifar_py
    (extracted / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(extracted))
    assert os.path.join("cifar-10-batches-py", "test_batch") in one_line(e)
