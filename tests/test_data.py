"""Tests for dynarch.data: IDX loading, search path, download, corruption, MNIST-1D cache."""

from __future__ import annotations

import gzip
import hashlib
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import dynarch.data as data
from dynarch.data import DataCorruptError, DataNotFoundError, Dataset, load

STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def tiny_arrays(seed: int = 0, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx(d: Path, arrays: dict[str, np.ndarray], gz: bool) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for field, arr in arrays.items():
        raw = idx_bytes(arr)
        path = d / (STEMS[field] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
        paths[field] = path
    return paths


def assert_matches(ds: Dataset, arrays: dict[str, np.ndarray], name: str = "mnist") -> None:
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    for split in ("train", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        want = torch.from_numpy(arrays[f"{split}_x"]).float().div(255).unsqueeze(1)
        assert torch.equal(x, want)
        assert y.tolist() == arrays[f"{split}_y"].tolist()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake HOME, no DYNARCH_DATA, an empty system dir and unreachable mirrors."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DYNARCH_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "system")
    for name in data.MIRRORS:
        monkeypatch.setitem(data.MIRRORS, name, (tmp_path / "no-server").as_uri() + "/")
    return home


# --- names and search path -------------------------------------------------------------


def test_available_and_name_spellings(tmp_path: Path) -> None:
    assert data.available() == ["fashion-mnist", "mnist", "mnist1d"]
    root = tmp_path / "r"
    for spelling in ("FashionMNIST", "fashion_mnist", "Fashion-MNIST", " fashionmnist "):
        assert data.search_dirs(spelling, root)[1] == root / "fashion-mnist"
    assert data.data_dir("MNIST_1D", root) == root / "mnist1d"
    msg = "unknown dataset 'cifar10'; available: fashion-mnist, mnist, mnist1d$"
    with pytest.raises(ValueError, match=msg):
        load("cifar10")
    with pytest.raises(TypeError, match="dataset name must be a str, got int 3"):
        load(3)  # type: ignore[arg-type]


def test_search_dirs_order(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / "env"
    monkeypatch.setenv("DYNARCH_DATA", str(env))
    assert data.search_dirs("mnist", tmp_path / "r") == [
        tmp_path / "r",
        tmp_path / "r" / "mnist",
        env / "mnist",
        env,
        isolated / ".cache" / "dynarch" / "mnist",
        tmp_path / "system" / "mnist",
    ]
    assert data.data_dir("mnist") == env / "mnist"
    monkeypatch.delenv("DYNARCH_DATA")
    assert data.search_dirs("mnist") == [
        isolated / ".cache" / "dynarch" / "mnist",
        tmp_path / "system" / "mnist",
    ]
    assert data.data_dir("mnist") == isolated / ".cache" / "dynarch" / "mnist"


# --- loading IDX files ------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", [False, True])
def test_load_from_root(tmp_path: Path, gz: bool, sub: bool) -> None:
    arrays = tiny_arrays()
    write_idx(tmp_path / "r" / ("mnist" if sub else ""), arrays, gz)
    ds = load("mnist", root=tmp_path / "r", download=False)
    assert_matches(ds, arrays)
    assert len(ds.train_y) == 6 and len(ds.test_y) == 4


@pytest.mark.parametrize("sub", [False, True])
def test_load_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub: bool) -> None:
    arrays = tiny_arrays(1)
    write_idx(tmp_path / "env" / ("mnist" if sub else ""), arrays, gz=True)
    monkeypatch.setenv("DYNARCH_DATA", str(tmp_path / "env"))
    assert_matches(load("mnist", download=False), arrays)


def test_lookup_precedence_and_mixed_files(tmp_path: Path, isolated: Path, monkeypatch) -> None:
    home_arrays, env_arrays, root_arrays = tiny_arrays(1), tiny_arrays(2), tiny_arrays(3)
    write_idx(isolated / ".cache" / "dynarch" / "mnist", home_arrays, gz=True)
    assert_matches(load("mnist", download=False), home_arrays)
    write_idx(tmp_path / "env" / "mnist", env_arrays, gz=False)
    monkeypatch.setenv("DYNARCH_DATA", str(tmp_path / "env"))
    assert_matches(load("mnist", download=False), env_arrays)
    paths = write_idx(tmp_path / "r", root_arrays, gz=True)
    paths["test_y"].unlink()  # a mix of plain and .gz files in one directory is fine
    (tmp_path / "r" / STEMS["test_y"]).write_bytes(idx_bytes(root_arrays["test_y"]))
    assert_matches(load("mnist", root=tmp_path / "r", download=False), root_arrays)


def test_fashion_mnist_payload_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_arrays()
    paths = write_idx(tmp_path / "r", arrays, gz=True)
    expected = data.IDX_SHA256["fashion-mnist"]["train_x"]
    actual = hashlib.sha256(idx_bytes(arrays["train_x"])).hexdigest()
    msg = (
        f"{paths['train_x']}: SHA-256 of the decompressed IDX data is {actual}, expected {expected}"
    )
    with pytest.raises(DataCorruptError, match=re.escape(msg)):
        load("fashion-mnist", root=tmp_path / "r", download=False)
    digests = {f: hashlib.sha256(idx_bytes(a)).hexdigest() for f, a in arrays.items()}
    monkeypatch.setitem(data.IDX_SHA256, "fashion-mnist", digests)
    assert_matches(
        load("fashion-mnist", root=tmp_path / "r", download=False), arrays, "fashion-mnist"
    )


# --- corrupted and truncated files -------------------------------------------------------


def _corrupt(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


@pytest.mark.parametrize(
    ("field", "mutate", "message"),
    [
        ("train_x", lambda b: b"\x12\x34\x56\x78" + b[4:],
         "bad IDX magic number 0x12345678, expected 0x00000803: "
         "not an IDX file (the first two bytes must be zero)"),
        ("train_x", lambda b: b"\x00\x00\x0d\x03" + b[4:],
         "bad IDX magic number 0x00000d03, expected 0x00000803: "
         "dtype code 0x0d, expected 0x08 (unsigned byte)"),
        ("test_y", lambda b: b"\x00\x00\x08\x02" + b[4:],
         "bad IDX magic number 0x00000802, expected 0x00000801: 2 dimensions, expected 1"),
        ("train_x", lambda b: b[:4000],
         "truncated: the header says shape (6, 28, 28) = 4704 bytes of data, the file holds 3984"),
        ("test_y", lambda b: b + b"\x00",
         "has trailing bytes: the header says shape (4,) = 4 bytes of data, the file holds 5"),
        ("train_x", lambda b: b[:10], "truncated: 10 bytes, shorter than the 16-byte IDX header"),
        ("test_x", lambda b: b"", "truncated: 0 bytes, shorter than the 16-byte IDX header"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_idx(tmp_path: Path, field: str, mutate, message: str, gz: bool) -> None:
    arrays = tiny_arrays()
    paths = write_idx(tmp_path, arrays, gz)
    _corrupt(paths[field], mutate(idx_bytes(arrays[field])))
    with pytest.raises(DataCorruptError, match=re.escape(f"{paths[field]}: {message}")):
        load("mnist", root=tmp_path, download=False)


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda b: b"this is not gzip data", "Not a gzipped file"),
        (lambda b: b[: len(b) // 2], "Compressed file ended before the end-of-stream marker"),
        (lambda b: b[:-8] + b"\xff" * 8, "CRC check failed"),
    ],
)
def test_bad_gzip(tmp_path: Path, damage, detail: str) -> None:
    paths = write_idx(tmp_path, tiny_arrays(), gz=True)
    path = paths["train_y"]
    path.write_bytes(damage(path.read_bytes()))
    msg = rf"^{re.escape(str(path))}: not a valid gzip file \(.*{detail}.*\); delete it and fetch"
    with pytest.raises(DataCorruptError, match=msg):
        load("mnist", root=tmp_path, download=False)


def test_inconsistent_contents(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    paths = write_idx(tmp_path, {**arrays, "train_y": arrays["train_y"][:5]}, gz=False)
    msg = f"{paths['train_x']} holds 6 images but {paths['train_y']} holds 5 labels"
    with pytest.raises(DataCorruptError, match=re.escape(msg)):
        load("mnist", root=tmp_path, download=False)
    paths = write_idx(tmp_path, {**arrays, "test_x": np.zeros((4, 27, 28), np.uint8)}, gz=False)
    msg = f"{paths['test_x']}: images are (27, 28) pixels, expected (28, 28)"
    with pytest.raises(DataCorruptError, match=re.escape(msg)):
        load("mnist", root=tmp_path, download=False)
    labels = np.array([0, 1, 10, 2], np.uint8)
    paths = write_idx(tmp_path, {**arrays, "test_y": labels}, gz=False)
    msg = f"{paths['test_y']}: label 10 out of range, expected 0..9"
    with pytest.raises(DataCorruptError, match=re.escape(msg)):
        load("mnist", root=tmp_path, download=False)


# --- not found ----------------------------------------------------------------------------


def test_not_found_lists_places(tmp_path: Path, isolated: Path, monkeypatch) -> None:
    monkeypatch.setenv("DYNARCH_DATA", str(tmp_path / "env"))
    partial = write_idx(tmp_path / "r", tiny_arrays(), gz=True)
    partial["train_x"].unlink()
    partial["test_y"].unlink()
    with pytest.raises(DataNotFoundError) as info:
        load("fashion-mnist", root=tmp_path / "r", download=False)
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value) == (
        "dataset 'fashion-mnist' not found (download=False). Looked for "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (plain or .gz) in:\n"
        f"  {tmp_path / 'r'}: missing train-images-idx3-ubyte, t10k-labels-idx1-ubyte\n"
        f"  {tmp_path / 'r' / 'fashion-mnist'}: not found\n"
        f"  {tmp_path / 'env' / 'fashion-mnist'}: not found\n"
        f"  {tmp_path / 'env'}: not found\n"
        f"  {isolated / '.cache' / 'dynarch' / 'fashion-mnist'}: not found\n"
        f"  {tmp_path / 'system' / 'fashion-mnist'}: not found\n"
        "To fix: `sudo apt-get install dataset-fashion-mnist`, or put the four files in a "
        "directory and set DYNARCH_DATA to it, or download them from "
        f"{data.MIRRORS['fashion-mnist']} (load(..., download=True) does this)."
    )
    with pytest.raises(DataNotFoundError, match=r"To fix: put the four files") as info:
        load("mnist", download=False)
    assert "apt-get" not in str(info.value)


# --- download -----------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """A file:// mirror for 'mnist' holding tiny .gz files, with their digests registered."""
    arrays = tiny_arrays(7)
    paths = write_idx(tmp_path / "server", arrays, gz=True)
    digests = {f: hashlib.sha256(p.read_bytes()).hexdigest() for f, p in paths.items()}
    monkeypatch.setitem(data.MIRRORS, "mnist", (tmp_path / "server").as_uri() + "/")
    monkeypatch.setitem(data.GZ_SHA256, "mnist", digests)
    return arrays


def test_download_good_checksum(server, isolated: Path) -> None:
    ds = load("mnist", progress=False)
    assert_matches(ds, server)
    target = isolated / ".cache" / "dynarch" / "mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(s + ".gz" for s in STEMS.values())
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in target.iterdir())
    assert_matches(load("mnist", download=False), server)  # kept: found without downloading


def test_download_into_env_and_root(server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DYNARCH_DATA", str(tmp_path / "env"))
    assert_matches(load("mnist", progress=False), server)
    assert len(list((tmp_path / "env" / "mnist").iterdir())) == 4
    assert_matches(load("mnist", root=tmp_path / "r", progress=False), server)  # found in env
    assert not (tmp_path / "r").exists()
    (tmp_path / "env" / "mnist" / (STEMS["test_y"] + ".gz")).unlink()
    assert_matches(load("mnist", root=tmp_path / "r", progress=False), server)
    assert len(list((tmp_path / "r" / "mnist").iterdir())) == 4


def test_download_only_missing(server, tmp_path: Path, isolated: Path) -> None:
    target = isolated / ".cache" / "dynarch" / "mnist"
    write_idx(target, {"train_x": server["train_x"]}, gz=False)
    (tmp_path / "server" / (STEMS["train_x"] + ".gz")).unlink()  # would fail if fetched
    assert_matches(load("mnist", progress=False), server)
    assert (target / STEMS["train_x"]).is_file()
    assert not (target / (STEMS["train_x"] + ".gz")).exists()


def test_download_bad_checksum(server, tmp_path: Path, isolated: Path, monkeypatch) -> None:
    monkeypatch.setitem(data.GZ_SHA256["mnist"], "test_x", "0" * 64)
    url = (tmp_path / "server").as_uri() + "/" + STEMS["test_x"] + ".gz"
    actual = hashlib.sha256(Path(tmp_path / "server" / (STEMS["test_x"] + ".gz")).read_bytes())
    target = isolated / ".cache" / "dynarch" / "mnist"
    msg = f"downloaded {url} for {target / (STEMS['test_x'] + '.gz')}: SHA-256 is "
    msg += f"{actual.hexdigest()}, expected {'0' * 64}; the download was discarded"
    with pytest.raises(DataCorruptError, match=re.escape(msg)):
        load("mnist", progress=False)
    assert sorted(p.name for p in target.iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]  # fetched before the bad one and verified; no temp file left


def test_download_failure(tmp_path: Path, isolated: Path) -> None:
    url = (tmp_path / "no-server").as_uri() + "/train-images-idx3-ubyte.gz"
    target = isolated / ".cache" / "dynarch" / "mnist"
    msg = rf"^dataset 'mnist' not found and downloading {re.escape(url)} into "
    msg += rf"{re.escape(str(target))} failed: .*No such file.*Looked for"
    with pytest.raises(DataNotFoundError, match=msg) as info:
        load("mnist", progress=False)
    assert isinstance(info.value.__cause__, OSError)
    assert list(target.iterdir()) == []


# --- Dataset ------------------------------------------------------------------------------


def toy() -> Dataset:
    y = torch.tensor([0, 1, 2, 0, 1])
    return Dataset("toy", torch.arange(10.0).view(5, 2), y, torch.ones(3, 2), y[:3], 3, (2,))


def test_dataset_subset_and_repr() -> None:
    ds = toy()
    assert repr(ds) == "Dataset('toy', train=5, test=3, input_shape=(2,), num_classes=3)"
    sub = ds.subset(2, None)
    assert repr(sub) == "Dataset('toy', train=2, test=3, input_shape=(2,), num_classes=3)"
    assert sub.train_x.tolist() == [[0.0, 1.0], [2.0, 3.0]] and sub.train_y.tolist() == [0, 1]
    assert ds.subset(None, 1).test_y.tolist() == [0] and ds.subset(5, 3).train_y.shape == (5,)
    for args, msg in [
        ((0, None), "n_train=0 is not allowed; use None or an int in [1, 5]"),
        ((6, None), "n_train=6 is not allowed; use None or an int in [1, 5]"),
        ((None, 4), "n_test=4 is not allowed; use None or an int in [1, 3]"),
        ((True, None), "n_train=True is not allowed"),
        ((None, 2.0), "n_test=2.0 is not allowed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            ds.subset(*args)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


def test_dataset_standardize() -> None:
    ds = toy()  # train_x = 0..9, test_x = ones
    whole = ds.standardize()
    mean, std = 4.5, torch.arange(10.0).std()
    assert torch.equal(whole.train_x, (ds.train_x - mean) / std)
    assert torch.equal(whole.test_x, (ds.test_x - mean) / std)
    assert whole.train_x.mean().abs() < 1e-6 and abs(float(whole.train_x.std()) - 1) < 1e-6
    assert whole.train_y is ds.train_y and whole.test_y is ds.test_y
    assert repr(whole) == repr(ds) and ds.train_x[0, 1] == 1.0  # a copy; ds is untouched
    fit3 = ds.standardize(n_fit=3)  # statistics of the first 3 samples only (0..5)
    first = torch.arange(6.0)
    assert torch.equal(fit3.train_x, (ds.train_x - first.mean()) / first.std())
    assert fit3.train_x[:3].mean().abs() < 1e-6 and fit3.train_x[3:].min() > 1
    for n_fit, msg in [
        (1, "n_fit=1 is not allowed; use None or an int in [2, 5]"),
        (6, "n_fit=6 is not allowed; use None or an int in [2, 5]"),
        (True, "n_fit=True is not allowed"),
        (2.0, "n_fit=2.0 is not allowed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            ds.standardize(n_fit=n_fit)  # type: ignore[arg-type]
    y = ds.train_y
    flat = Dataset("flat", torch.ones(3, 2), y[:3], torch.ones(1, 2), y[:1], 3, (2,))
    msg = "standardize: the training inputs of 'flat' are constant (std 0); nothing to scale"
    with pytest.raises(ValueError, match=re.escape(msg)):
        flat.standardize()


def test_dataset_validation() -> None:
    y = torch.tensor([0, 1])
    x = torch.zeros(2, 2)
    msg = "train_x must be float32 and train_y int64, got torch.float64 and torch.int64"
    with pytest.raises(TypeError, match=msg):
        Dataset("t", x.double(), y, x, y, 2, (2,))
    msg = "test_x has shape (2, 2) and test_y (2,); expected (N, *(3,)) and (N,)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        Dataset("t", torch.zeros(2, 3), y, x, y, 2, (3,))
    msg = "train_y has labels in [0, 1], allowed is [0, 0]"
    with pytest.raises(ValueError, match=re.escape(msg)):
        Dataset("t", x, y, x, y, 1, (2,))


# --- real data ----------------------------------------------------------------------------


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", SYSTEM_FASHION.parent)
    ds = load("fashion_mnist", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist1d-data")


@pytest.mark.slow  # generates the real data set once (~4 s)
def test_mnist1d_real(mnist1d_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNARCH_DATA", str(mnist1d_dir))
    np.random.seed(123)
    random.seed(123)
    first = load("MNIST-1D")
    assert (np.random.randint(1 << 30), random.random()) == (
        np.random.RandomState(123).randint(1 << 30),
        random.Random(123).random(),
    )  # global RNGs untouched by generation
    assert (
        repr(first)
        == "Dataset('mnist1d', train=4000, test=1000, input_shape=(40,), num_classes=10)"
    )
    assert first.train_x.shape == (4000, 40) and first.test_x.dtype == torch.float32
    assert sorted(first.train_y.unique().tolist()) == list(range(10))
    (cache,) = (mnist1d_dir / "mnist1d").glob("mnist1d-*.npz")
    second = load("mnist1d")
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert cache.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:1000]),
        lambda p: p.write_bytes(b"garbage"),
        lambda p: np.savez(p.open("wb"), x=np.zeros((3, 40), np.float32)),
    ],
)
def test_mnist1d_damaged_cache_regenerated(tmp_path: Path, monkeypatch, damage) -> None:
    import mnist1d.data

    calls = []

    def fake_make_dataset(args):  # same shapes as the real one, much faster
        calls.append(args.seed)
        rng = np.random.default_rng(0)
        return {
            "x": rng.normal(size=(4000, 40)),
            "x_test": rng.normal(size=(1000, 40)),
            "y": np.arange(4000) % 10,
            "y_test": np.arange(1000) % 10,
        }

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    first = load("mnist1d", root=tmp_path)
    (cache,) = (tmp_path / "mnist1d").glob("mnist1d-*.npz")
    damage(cache)
    with pytest.warns(UserWarning, match=rf"ignoring damaged cache {re.escape(str(cache))} \("):
        second = load("mnist1d", root=tmp_path)
    assert calls == [42, 42]
    assert torch.equal(first.train_x, second.train_x)
    assert torch.equal(load("mnist1d", root=tmp_path).test_y, first.test_y)
    assert calls == [42, 42]  # the rewritten cache is trusted again
