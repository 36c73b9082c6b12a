"""Tests for fedredefense_jax.data (synthetic data; real data via $FEDREDEFENSE_DATA)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from fedredefense_jax import data
from fedredefense_jax.data import SPECS, DataError, load_dataset, normalize

FMNIST = SPECS["fashion_mnist"]
CIFAR = SPECS["cifar10"]
CINIC = SPECS["cinic10"]


# ---------------------------------------------------------------------------
# Helpers building tiny inputs
# ---------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array (header: magic, then big-endian dims)."""
    if magic is None:
        magic = 0x0800 | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_dir(root, n_train=5, n_test=3, gz=True, seed=0):
    """Write the four Fashion-MNIST files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_file(root, stem, idx_bytes(arr), gz)
    return arrays


def write_file(root, stem, raw: bytes, gz=True):
    path = root / (stem + ".gz" if gz else stem)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root, spec=CIFAR, splits=("train", "test"), per_class=2, seed=0,
              shape=None):
    """Write <split>/<class>/<i>.png with random images; return expected arrays.

    Files are written in reverse name order so sorting is exercised.
    """
    rng = np.random.default_rng(seed)
    shape = shape or spec.input_shape
    expected = {}
    for split in splits:
        xs, ys = [], []
        for label, cls in enumerate(spec.classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            imgs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(per_class)]
            for i in reversed(range(per_class)):
                (d / f"{i:04d}.png").write_bytes(png_bytes(imgs[i]))
            xs += imgs
            ys += [label] * per_class
        expected[split] = (np.stack(xs), np.asarray(ys, np.int32))
    return expected


def make_tar(src_dir, tar_path, top: str | None = None):
    """Pack the contents of src_dir into a .tar.gz (optionally under top/)."""
    with tarfile.open(tar_path, "w:gz") as tf:
        for entry in sorted(os.listdir(src_dir)):
            arcname = f"{top}/{entry}" if top else entry
            tf.add(os.path.join(src_dir, entry), arcname=arcname)
    return tar_path


def assert_same(a: data.Dataset, b: data.Dataset):
    for f in ("train_x", "train_y", "test_x", "test_y", "valid_x", "valid_y"):
        va, vb = getattr(a, f), getattr(b, f)
        if va is None or vb is None:
            assert va is None and vb is None, f
        else:
            np.testing.assert_array_equal(va, vb, err_msg=f)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------
# Specs, normalize, import hygiene
# ---------------------------------------------------------------------------


def test_specs_facts():
    assert set(SPECS) == {"fashion_mnist", "cifar10", "cinic10"}
    assert FMNIST.input_shape == (28, 28, 1) and FMNIST.classes[0] == "tshirt_top"
    assert FMNIST.classes[-1] == "ankle_boot"
    assert CIFAR.classes == ("airplane", "automobile", "bird", "cat", "deer",
                             "dog", "frog", "horse", "ship", "truck")
    assert CINIC.classes == CIFAR.classes and CINIC.input_shape == (32, 32, 3)
    for s in SPECS.values():
        assert s.num_classes == len(s.classes) == 10
        assert len(s.mean) == len(s.std) == s.input_shape[-1]


def test_normalize():
    x = np.array([[[[0, 255, 128]]]], dtype=np.uint8)  # [1, 1, 1, 3]
    out = normalize(x, CIFAR)
    assert out.dtype == np.float32 and out.shape == x.shape
    expect = (np.array([0, 1, 128 / 255]) - np.array(CIFAR.mean)) / np.array(CIFAR.std)
    np.testing.assert_allclose(out[0, 0, 0], expect, rtol=1e-6)
    g = normalize(np.full((2, 28, 28, 1), 255, np.uint8), FMNIST)
    np.testing.assert_allclose(g, (1 - 0.1307) / 0.3081, rtol=1e-6)
    with pytest.raises(ValueError):
        normalize(np.zeros((2, 32, 32, 3), np.uint8), FMNIST)


@pytest.mark.slow
def test_import_does_not_pull_tensorflow():
    code = ("import sys, fedredefense_jax.data; "
            "assert 'tensorflow' not in sys.modules; "
            "assert 'tensorflow_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))


def test_unknown_dataset():
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir="/nonexistent")
    msg = one_line(e)
    assert "mnist" in msg and "cifar10" in msg and "fashion_mnist" in msg and "cinic10" in msg


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        load_dataset("cifar10", data_dir=str(missing), cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------
# No data_dir: TFDS on request, CINIC-10 (no network, no TensorFlow needed;
# downloads are tested in test_download.py)
# ---------------------------------------------------------------------------


def test_tfds_missing_tensorflow(monkeypatch):
    monkeypatch.setenv("FEDREDEFENSE_TFDS", "1")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import -> ImportError
    with pytest.raises(DataError) as e:
        load_dataset("cifar10")
    msg = one_line(e)
    assert "pip install -e .[tfds]" in msg and "--data_dir" in msg and "FEDREDEFENSE_TFDS" in msg


def test_cinic_needs_data_dir():
    with pytest.raises(DataError) as e:
        load_dataset("cinic10")
    msg = one_line(e)
    assert "--data_dir" in msg and "CINIC-10" in msg


# ---------------------------------------------------------------------------
# Fashion-MNIST IDX
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path, gz=gz)
    ds = load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert ds.spec is FMNIST
    assert ds.train_x.shape == (5, 28, 28, 1) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (3, 28, 28, 1)
    assert ds.train_y.dtype == np.int32 and ds.test_y.shape == (3,)
    np.testing.assert_array_equal(ds.train_x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_y, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_x[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert ds.valid_x is None and ds.valid_y is None


def test_idx_missing_file(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert "t10k-labels-idx1-ubyte" in one_line(e)


def test_idx_truncated_gzip(tmp_path):
    write_idx_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in one_line(e)


def test_idx_not_gzip(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert "train-labels-idx1-ubyte.gz" in one_line(e)


def test_idx_wrong_magic(tmp_path):
    arrays = write_idx_dir(tmp_path)
    # Labels file written where images are expected: magic 2049 != 2051.
    write_file(tmp_path, "train-images-idx3-ubyte", idx_bytes(arrays["train-labels-idx1-ubyte"]))
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    msg = one_line(e)
    assert "train-images-idx3-ubyte.gz" in msg and "2049" in msg


def test_idx_byte_count_mismatch(tmp_path):
    arrays = write_idx_dir(tmp_path)
    raw = idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-7]
    write_file(tmp_path, "t10k-images-idx3-ubyte", raw)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert "t10k-images-idx3-ubyte.gz" in one_line(e)


def test_idx_count_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    write_file(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
    msg = one_line(e)
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg


def test_idx_wrong_image_size(tmp_path):
    write_idx_dir(tmp_path)
    write_file(tmp_path, "train-images-idx3-ubyte", idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_idx_label_out_of_range(tmp_path):
    write_idx_dir(tmp_path)
    write_file(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.full(5, 10, np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# Image-folder trees and archives
# ---------------------------------------------------------------------------


def test_tree_dir_and_tar_identical(tmp_path):
    tree = tmp_path / "tree"
    expected = make_tree(tree)
    tar_flat = make_tar(tree, tmp_path / "flat.tar.gz")
    tar_top = make_tar(tree, tmp_path / "top.tgz", top="cifar10")
    tar_dot = make_tar(tree, tmp_path / "dot.tar", top=".")  # like `tar -C tree .`
    cache = str(tmp_path / "cache")
    ds_dir = load_dataset("cifar10", data_dir=str(tree), cache_dir=cache)
    ds_flat = load_dataset("cifar10", data_dir=str(tar_flat), cache_dir=cache)
    ds_top = load_dataset("cifar10", data_dir=str(tar_top), cache_dir=cache)
    ds_dot = load_dataset("cifar10", data_dir=str(tar_dot), cache_dir=cache)
    for ds in (ds_dir, ds_flat, ds_top, ds_dot):
        assert ds.train_x.shape == (20, 32, 32, 3) and ds.train_x.dtype == np.uint8
        assert ds.train_y.dtype == np.int32
        np.testing.assert_array_equal(ds.train_x, expected["train"][0])
        np.testing.assert_array_equal(ds.train_y, expected["train"][1])
        np.testing.assert_array_equal(ds.test_x, expected["test"][0])
        np.testing.assert_array_equal(ds.test_y, expected["test"][1])
        assert ds.valid_x is None
    np.testing.assert_array_equal(ds_dir.train_y, np.repeat(np.arange(10), 2))
    assert_same(ds_dir, ds_flat)
    assert_same(ds_dir, ds_top)
    assert len([f for f in os.listdir(cache) if f.endswith(".npz")]) == 4
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]


def test_tree_dir_under_single_top_folder(tmp_path):
    expected = make_tree(tmp_path / "outer" / "CIFAR-10")
    ds = load_dataset("cifar10", data_dir=str(tmp_path / "outer"), cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(ds.test_x, expected["test"][0])


def test_cache_hit_skips_decoding(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    tar = make_tar(tree, tmp_path / "t.tar.gz")
    cache = str(tmp_path / "cache")
    first = load_dataset("cifar10", data_dir=str(tar), cache_dir=cache)

    def boom(*args, **kwargs):
        raise AssertionError("decoder called despite cache")

    monkeypatch.setattr(data.image_folder, "_decode_image", boom)
    monkeypatch.setattr(data.image_folder, "_iter_tar", boom)
    second = load_dataset("cifar10", data_dir=str(tar), cache_dir=cache)
    assert_same(first, second)
    # Cache is keyed by dataset name too: cinic10 on the same archive decodes.
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset("cinic10", data_dir=str(tar), cache_dir=cache)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    monkeypatch.setenv("FEDREDEFENSE_CACHE", str(tmp_path / "envcache"))
    load_dataset("cifar10", data_dir=str(tree))
    assert any(f.endswith(".npz") for f in os.listdir(tmp_path / "envcache"))


def test_corrupt_cache_is_rebuilt(tmp_path):
    tree = tmp_path / "tree"
    expected = make_tree(tree, per_class=1)
    cache = tmp_path / "cache"
    load_dataset("cifar10", data_dir=str(tree), cache_dir=str(cache))
    (npz,) = list(cache.glob("*.npz"))
    npz.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cache"):
        ds = load_dataset("cifar10", data_dir=str(tree), cache_dir=str(cache))
    np.testing.assert_array_equal(ds.train_x, expected["train"][0])


def test_cinic_valid_split(tmp_path):
    tree = tmp_path / "cinic"
    expected = make_tree(tree, spec=CINIC, splits=("train", "valid", "test"), per_class=1)
    ds = load_dataset("cinic10", data_dir=str(make_tar(tree, tmp_path / "CINIC-10.tar.gz")),
                      cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(ds.valid_x, expected["valid"][0])
    np.testing.assert_array_equal(ds.valid_y, expected["valid"][1])
    assert ds.spec is CINIC


def test_fashion_mnist_grayscale_folders(tmp_path):
    tree = tmp_path / "fm"
    expected = make_tree(tree, spec=FMNIST, per_class=1)
    ds = load_dataset("fashion_mnist", data_dir=str(tree), cache_dir=str(tmp_path / "c"))
    assert ds.train_x.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(ds.train_x, expected["train"][0])


def test_unknown_class_folder(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    (tree / "train" / "kitten").mkdir()
    (tree / "train" / "kitten" / "0.png").write_bytes(
        png_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "c"))
    assert "train/kitten" in one_line(e)
    tar = make_tar(tree, tmp_path / "bad.tar.gz")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tar), cache_dir=str(tmp_path / "c"))
    msg = one_line(e)
    assert "bad.tar.gz" in msg and "train/kitten" in msg


def test_empty_class_folder(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    (tree / "test" / "frog" / "0000.png").unlink()
    for src in (tree, make_tar(tree, tmp_path / "e.tar.gz")):
        with pytest.raises(DataError) as e:
            load_dataset("cifar10", data_dir=str(src), cache_dir=str(tmp_path / "c"))
        msg = one_line(e)
        assert "test/frog" in msg and "empty" in msg


def test_missing_class_folder(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    (tree / "train" / "ship" / "0000.png").unlink()
    (tree / "train" / "ship").rmdir()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "c"))
    msg = one_line(e)
    assert "train/ship" in msg and "missing" in msg


def test_missing_split(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, splits=("train",), per_class=1)
    with pytest.raises(DataError, match="test"):
        load_dataset("cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "c"))


def test_wrong_image_size_names_archive_member(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    (tree / "train" / "dog" / "0000.png").write_bytes(png_bytes(np.zeros((31, 32, 3), np.uint8)))
    tar = make_tar(tree, tmp_path / "sz.tar.gz")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tar), cache_dir=str(tmp_path / "c"))
    msg = one_line(e)
    assert "sz.tar.gz:train/dog/0000.png" in msg and "32x31" in msg


def test_undecodable_image(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    (tree / "test" / "cat" / "0000.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "c"))
    assert "test/cat/0000.png" in one_line(e)


def test_truncated_archive(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, per_class=1)
    tar = make_tar(tree, tmp_path / "trunc.tar.gz")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tar), cache_dir=str(tmp_path / "c"))
    assert "trunc.tar.gz" in one_line(e)


def test_dir_without_tree(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset("cifar10", data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------------------
# Real data (set FEDREDEFENSE_DATA to the shared data directory)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_data_dir(shared_data):
    return os.path.abspath(shared_data)


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cifar_cache"))


@pytest.fixture(scope="session")
def cifar_first_load(real_data_dir, cifar_cache):
    path = os.path.join(real_data_dir, "cifar10_jpeg.tar.gz")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", data_dir=path, cache_dir=cifar_cache)
    return path, ds, time.perf_counter() - t0


def test_real_fashion_mnist(real_data_dir):
    path = os.path.join(real_data_dir, "fashion_mnist")
    if not os.path.isdir(path):
        pytest.skip(f"{path} not found")
    ds = load_dataset("fashion_mnist", data_dir=path)
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (10000, 28, 28, 1)
    assert ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
    assert abs(ds.train_x.mean() / 255 - 0.2860) < 0.001


def test_real_cifar10(cifar_first_load, cifar_cache, monkeypatch):
    path, ds, first_s = cifar_first_load
    print(f"\nCIFAR-10 first decode: {first_s:.2f} s")
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
    means = ds.train_x.reshape(-1, 3).mean(axis=0) / 255
    print(f"CIFAR-10 train channel means: {np.round(means, 4).tolist()}")
    np.testing.assert_allclose(means, CIFAR.mean, atol=0.002)

    def no_decoding(*args):
        raise AssertionError("the second load decoded the archive instead of reading the cache")

    monkeypatch.setattr(data.cache, "_load_tree", no_decoding)  # the cache must serve the second load
    t0 = time.perf_counter()
    cached = load_dataset("cifar10", data_dir=path, cache_dir=cifar_cache)
    print(f"CIFAR-10 cached load: {time.perf_counter() - t0:.3f} s")
    assert_same(ds, cached)
