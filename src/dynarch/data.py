"""Real datasets as tensors with a fixed train/test split.

Fashion-MNIST and MNIST are read from IDX files (:mod:`dynarch._idx`) found on disk (or
downloaded and checked with SHA-256); MNIST-1D is generated locally with the ``mnist1d``
package and cached.

Example:
    >>> from dynarch.data import load
    >>> ds = load("mnist1d")
    >>> tuple(ds.train_x.shape), ds.num_classes
    ((4000, 40), 10)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ._idx import STEMS, DataCorruptError, find_idx, read_idx_splits

__all__ = [
    "GZ_SHA256",
    "IDX_SHA256",
    "MIRRORS",
    "DataCorruptError",
    "DataNotFoundError",
    "Dataset",
    "available",
    "data_dir",
    "load",
    "search_dirs",
]

DOWNLOAD_TIMEOUT = 60.0  # seconds, for connecting and for each read
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install

# Base URLs of the canonical sources; tests and users may point these at a mirror.
MIRRORS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}

# Per file (keys as in Dataset: train_x = train-images-idx3-ubyte, ...), SHA-256 of:
# - the upstream .gz files, checked on download. Source: tensorflow/datasets,
#   tensorflow_datasets/url_checksums/fashion_mnist.txt and .../url_checksums/mnist.txt
#   (same URLs as MIRRORS).
GZ_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train_x": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train_y": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "test_x": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "test_y": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "mnist": {
        "train_x": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train_y": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "test_x": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "test_y": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
}
# - the decompressed IDX data, checked whenever a file is loaded. Fashion-MNIST: computed from
#   Debian's dataset-fashion-mnist files (Debian recompressed the .gz files, so their .gz
#   digests differ from upstream; the decompressed bytes are the upstream ones). MNIST: no
#   published digest found, so MNIST files on disk are only checked structurally.
IDX_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train_x": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train_y": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test_x": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test_y": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "mnist": {},
}

_ALIASES = {"fashionmnist": "fashion-mnist", "mnist": "mnist", "mnist1d": "mnist1d"}


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are nowhere on disk and could not be downloaded.

    Example:
        >>> issubclass(DataNotFoundError, FileNotFoundError)
        True
    """


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory as tensors, with a fixed train/test split.

    ``*_x`` are float32 of shape ``(N, *input_shape)``; ``*_y`` are int64 labels in
    ``[0, num_classes)``.

    Example:
        >>> import torch
        >>> ds = Dataset("toy", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]),
        ...              torch.ones(2, 2), torch.tensor([1, 0]), 2, (2,))
        >>> ds.subset(2, 1)
        Dataset('toy', train=2, test=1, input_shape=(2,), num_classes=2)
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise TypeError(
                    f"Dataset {self.name!r}: {split}_x must be float32 and {split}_y int64, "
                    f"got {x.dtype} and {y.dtype}"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape) or y.shape != x.shape[:1]:
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_x has shape {tuple(x.shape)} and {split}_y "
                    f"{tuple(y.shape)}; expected (N, *{tuple(self.input_shape)}) and (N,)"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_y has labels in [{int(y.min())}, "
                    f"{int(y.max())}], allowed is [0, {self.num_classes - 1}]"
                )

    def subset(self, n_train: int | None, n_test: int | None) -> Dataset:
        """Return the first ``n_train`` training and ``n_test`` test samples (None: all).

        Example:
            >>> import torch
            >>> ds = Dataset("toy", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]),
            ...              torch.ones(2, 2), torch.tensor([1, 0]), 2, (2,))
            >>> ds.subset(3, None).train_y.tolist()
            [0, 1, 0]
        """
        sizes = {"n_train": (n_train, len(self.train_y)), "n_test": (n_test, len(self.test_y))}
        for arg, (n, size) in sizes.items():
            if n is not None and (
                isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= size
            ):
                raise ValueError(
                    f"subset: {arg}={n!r} is not allowed; use None or an int in [1, {size}]"
                )
        a, b = (size if n is None else n for n, size in sizes.values())
        return Dataset(
            self.name, self.train_x[:a], self.train_y[:a], self.test_x[:b], self.test_y[:b],
            self.num_classes, self.input_shape,
        )  # fmt: skip

    def standardize(self, n_fit: int | None = None) -> Dataset:
        """Return a copy whose inputs are ``(x - mean) / std``, with one scalar mean and std
        taken over the first ``n_fit`` training samples (None: all of them; pass the size of
        the training split when the last samples are held out for validation, so nothing is
        learnt from them). Sparse layers with few inputs per unit train markedly better on
        centred inputs.

        Example:
            >>> import torch
            >>> ds = Dataset("toy", torch.tensor([[0.0], [2.0], [4.0]]), torch.tensor([0, 1, 0]),
            ...              torch.tensor([[1.0]]), torch.tensor([1]), 2, (1,))
            >>> [round(v, 4) for v in ds.standardize(n_fit=2).train_x.flatten().tolist()]
            [-0.7071, 0.7071, 2.1213]
        """
        n = len(self.train_y)
        if n_fit is not None and (
            isinstance(n_fit, bool) or not isinstance(n_fit, int) or not 2 <= n_fit <= n
        ):
            raise ValueError(
                f"standardize: n_fit={n_fit!r} is not allowed; use None or an int in [2, {n}]"
            )
        fit = self.train_x[: n if n_fit is None else n_fit]
        mean, std = fit.mean(), fit.std()
        if not torch.isfinite(std) or std <= 0:
            raise ValueError(
                f"standardize: the training inputs of {self.name!r} are constant "
                f"(std {float(std):g}); nothing to scale"
            )
        return Dataset(
            self.name, (self.train_x - mean) / std, self.train_y, (self.test_x - mean) / std,
            self.test_y, self.num_classes, self.input_shape,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"input_shape={tuple(self.input_shape)}, num_classes={self.num_classes})"
        )


def available() -> list[str]:
    """Names accepted by :func:`load`.

    Example:
        >>> available()
        ['fashion-mnist', 'mnist', 'mnist1d']
    """
    return sorted(set(_ALIASES.values()))


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _ALIASES[key]


def search_dirs(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories searched for a dataset's files, in order (read from the environment now).

    ``root`` and ``root/<name>``; ``$DYNARCH_DATA/<name>`` and ``$DYNARCH_DATA``;
    ``~/.cache/dynarch/<name>``; ``/usr/share/datasets/<name>``.

    Example:
        >>> search_dirs("mnist", root="/data")[:2]
        [PosixPath('/data'), PosixPath('/data/mnist')]
    """
    name = _canonical(name)
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root).expanduser(), Path(root).expanduser() / name]
    env = os.environ.get("DYNARCH_DATA")
    if env:
        dirs += [Path(env).expanduser() / name, Path(env).expanduser()]
    dirs += [Path.home() / ".cache" / "dynarch" / name, SYSTEM_DATA_DIR / name]
    return list(dict.fromkeys(dirs))


def data_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Directory that downloads and generated caches are written to.

    ``root/<name>`` if ``root`` is given, else ``$DYNARCH_DATA/<name>``, else
    ``~/.cache/dynarch/<name>``.

    Example:
        >>> data_dir("mnist1d", root="/data")
        PosixPath('/data/mnist1d')
    """
    name = _canonical(name)
    if root is not None:
        return Path(root).expanduser() / name
    env = os.environ.get("DYNARCH_DATA")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "dynarch"
    return base / name


def load(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name (see :func:`available`); spellings like ``FashionMNIST`` work.

    Images come as float32 in [0, 1] of shape (N, 1, 28, 28) (60000 train / 10000 test);
    ``mnist1d`` as float32 of shape (N, 40) (4000 / 1000), generated locally and cached.
    ``root``: see :func:`search_dirs` and :func:`data_dir`; ``progress``: show a download bar.
    Raises DataNotFoundError (listing every place searched) or DataCorruptError.

    Example:
        >>> ds = load("mnist1d")
        >>> ds
        Dataset('mnist1d', train=4000, test=1000, input_shape=(40,), num_classes=10)
    """
    name = _canonical(name)
    if name == "mnist1d":
        return _load_mnist1d(data_dir(name, root))
    tried: list[str] = []
    for d in search_dirs(name, root):
        files, missing = find_idx(d)
        if not missing:
            return _read_idx_dataset(name, files)
        lacking = ", ".join(STEMS[f] for f in missing)
        tried.append(f"  {d}: " + ("not found" if not files else f"missing {lacking}"))
    hint = f"Looked for {', '.join(STEMS.values())} (plain or .gz) in:\n" + "\n".join(tried)
    fix = "\nTo fix: "
    if name == "fashion-mnist":
        fix += "`sudo apt-get install dataset-fashion-mnist`, or "
    fix += "put the four files in a directory and set DYNARCH_DATA to it, or download them "
    fix += f"from {MIRRORS[name]} (load(..., download=True) does this)."
    if not download:
        raise DataNotFoundError(f"dataset {name!r} not found (download=False). {hint}{fix}")
    target = data_dir(name, root)
    url = MIRRORS[name]
    try:
        for field in find_idx(target)[1]:
            url = MIRRORS[name].rstrip("/") + f"/{STEMS[field]}.gz"
            _download(url, target / f"{STEMS[field]}.gz", GZ_SHA256[name][field], progress)
    except OSError as exc:  # URLError, timeouts, disk errors
        raise DataNotFoundError(
            f"dataset {name!r} not found and downloading {url} into {target} failed: {exc}. "
            f"{hint}{fix}"
        ) from exc
    return _read_idx_dataset(name, find_idx(target)[0])


def _read_idx_dataset(name: str, files: dict[str, Path]) -> Dataset:
    """The dataset ``name`` from its four IDX ``files``, checked against ``IDX_SHA256``."""
    tensors = read_idx_splits(files, IDX_SHA256[name])
    return Dataset(name=name, num_classes=10, input_shape=(1, 28, 28), **tensors)


@contextmanager
def _atomic_file(dest: Path) -> Iterator[IO[bytes]]:
    """Yield a temp file next to ``dest``; after the block fsync it and move it onto ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(url: str, dest: Path, sha256: str, progress: bool) -> None:
    """Fetch ``url`` into ``dest`` atomically; keep it only if its SHA-256 matches."""
    digest = hashlib.sha256()
    with (
        _atomic_file(dest) as out,
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp,
    ):
        size = resp.headers.get("Content-Length")
        bar = tqdm(
            total=int(size) if size else None, unit="B", unit_scale=True,
            desc=dest.name, disable=not progress, leave=False,
        )  # fmt: skip
        with bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if (actual := digest.hexdigest()) != sha256:
            raise DataCorruptError(
                f"downloaded {url} for {dest}: SHA-256 is {actual}, expected {sha256}; "
                "the download was discarded (damaged transfer or changed upstream file)"
            )


def _load_mnist1d(cache_dir: Path) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    key_src = {k: v for k, v in vars(args).items() if k != "url"}
    key_src["mnist1d_version"] = version("mnist1d")
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"mnist1d-{key}.npz"
    n_total = (args.num_samples // 10) * 10
    n_train = int(n_total * args.train_split)
    shapes = {
        "x": (n_train, args.final_seq_length),
        "y": (n_train,),
        "x_test": (n_total - n_train, args.final_seq_length),
        "y_test": (n_total - n_train,),
    }
    arrays = _read_mnist1d_cache(path, shapes)
    if arrays is None:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:  # make_dataset seeds the global RNGs; give the caller theirs back
            raw = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: raw[k].astype(np.float32 if "x" in k else np.int64) for k in shapes}
        _write_npz(path, arrays)
    t = {k: torch.from_numpy(a) for k, a in arrays.items()}
    return Dataset(
        "mnist1d", t["x"], t["y"], t["x_test"], t["y_test"], 10, (args.final_seq_length,)
    )


def _read_mnist1d_cache(
    path: Path, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays: dict[str, Any] = {k: z[k] for k in shapes}
        for k, shape in shapes.items():
            a = arrays[k]
            kind = np.float32 if "x" in k else np.int64
            if a.shape != shape or a.dtype != kind:
                raise ValueError(f"{k} is {a.dtype}{a.shape}, expected {kind.__name__}{shape}")
            if "x" in k and not np.isfinite(a).all():
                raise ValueError(f"{k} holds non-finite values")
            if "y" in k and (a.min() < 0 or a.max() > 9):
                raise ValueError(f"{k} holds labels outside 0..9")
    except Exception as exc:  # any damage: regenerate rather than trust the file
        warnings.warn(f"ignoring damaged cache {path} ({exc}); regenerating", stacklevel=3)
        return None
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        with _atomic_file(path) as out:
            savez: Any = np.savez  # numpy's stub mistypes **kwargs
            savez(out, **arrays)
    except OSError as exc:
        warnings.warn(f"cannot write cache {path} ({exc}); continuing without it", stacklevel=3)
