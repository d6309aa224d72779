"""Readers for the image data sets: the mosaic experiments (paper section 4.2, appendix F.2) and the
MNIST elements of the set tasks.

The standard on-disk formats are read here with numpy / gzip / zipfile / Pillow and a restricted
unpickler (no torchvision needed, which does not import beside every CPU build of torch):

* MNIST and Fashion-MNIST: gzip-compressed (or plain) IDX files, ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
* CIFAR-10: the binary batches (``*.bin``, records of 1 label byte + 3072 pixel bytes) or the python
  pickled batches (``data_batch_1..5``, ``test_batch``).
* Tiny ImageNet (the stand-in for ImageNet 64x64): a folder or a zip with the original layout
  ``tiny-imagenet-200/{wnids.txt, val/val_annotations.txt, val/images/*.JPEG, [train/<wnid>/images/*.JPEG]}``,
  plus the pre-decoded ``val_first1000_*.npy`` files of ``shared/data``.

Every reader returns an :class:`ImageSplit` with ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,).
A missing or malformed file raises :class:`DataFormatError` (a ``ValueError``) or ``FileNotFoundError``
naming the file and what was expected.
"""
from __future__ import annotations

import gzip
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cli import default_data_root
from .safe_pickle import restricted_load

DATASETS = ("mnist", "fashion-mnist", "cifar10", "tiny-imagenet")
# Sub-folder of --data-root holding each data set (the layout of shared/data, see its README).
FOLDERS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10",
           "tiny-imagenet": "tiny-imagenet-200"}
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "tiny-imagenet": 200}

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
CIFAR_RECORD = 1 + 3 * 32 * 32


class DataFormatError(ValueError):
    """A data file exists but does not hold what its format promises."""


@dataclass
class ImageSplit:
    """images: uint8 (N, C, H, W); labels: int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images: expected uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels: expected ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, n: Optional[int]) -> "ImageSplit":
        """The first ``n`` images (all of them for None); deterministic, so --subset is reproducible."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"subset: expected a positive size, got {n}")
        return ImageSplit(self.images[:n], self.labels[:n])


# ----------------------------------------------------------------------------------------- IDX
def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    # gzip raises these for truncated or non-gzip content (OSError, EOFError) and for a damaged
    # compressed stream (zlib.error, which is neither)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot decompress ({e}); expected a gzip-compressed IDX file") from None


def read_idx(path: str | os.PathLike, *, expect_magic: int) -> np.ndarray:
    """Read an IDX file (http://yann.lecun.com/exdb/mnist/): big-endian int32 magic, dims, then uint8 data.

    ``expect_magic`` is 2051 for image files (count, rows, cols) and 2049 for label files (count).
    Raises :class:`DataFormatError` naming the file for a wrong magic number or a truncated body.
    """
    path = Path(path)
    raw = _read_bytes(path)
    ndim = expect_magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        raise DataFormatError(f"{path}: wrong IDX magic number {magic}, expected {expect_magic} "
                              f"({'images' if expect_magic == IDX_IMAGES_MAGIC else 'labels'} file)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(dims))
    if len(raw) - header != need:
        raise DataFormatError(f"{path}: IDX body has {len(raw) - header} bytes, expected {need} for shape {dims} "
                              f"(truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, names: list[str]) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(f"{folder}: none of {names} found (expected the MNIST-style IDX files)")


def load_idx_dataset(folder: str | os.PathLike, split: str) -> ImageSplit:
    """MNIST / Fashion-MNIST split ('train' or 'test') from ``folder`` holding the four IDX(.gz) files."""
    folder = Path(folder)
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = _find(folder, [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    lab_path = _find(folder, [f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    images = read_idx(img_path, expect_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, expect_magic=IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    return ImageSplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


# ------------------------------------------------------------------------------------- CIFAR-10
def read_cifar_binary(path: str | os.PathLike) -> ImageSplit:
    """One CIFAR-10 binary batch: records of 1 label byte then 1024 R, 1024 G, 1024 B bytes (32x32 row-major)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise DataFormatError(f"{path}: {len(raw)} bytes is not a positive multiple of the CIFAR-10 record size "
                              f"{CIFAR_RECORD} (1 label + 3x32x32 pixels)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataFormatError(f"{path}: label byte {labels.max()} out of range 0..9")
    images = rec[:, 1:].reshape(-1, 3, 32, 32)
    return ImageSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def read_cifar_pickle(path: str | os.PathLike) -> ImageSplit:
    """One CIFAR-10 python batch: a pickled dict with b'data' uint8 (N, 3072) and b'labels' (N,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        d = restricted_load(path, allow_numpy=True, encoding="bytes")   # arrays only: no code from the file
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a format problem of this file
        raise DataFormatError(f"{path}: expected a pickled CIFAR-10 batch dict with b'data' and b'labels' ({e!r})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataFormatError(f"{path}: b'data' has shape {data.shape} and b'labels' {labels.shape}; "
                              f"expected (N, 3072) and (N,)")
    return ImageSplit(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def load_cifar10(folder: str | os.PathLike, split: str) -> ImageSplit:
    """CIFAR-10 split from binary batches (``data_batch_*.bin`` / ``test_batch*.bin``) or python batches."""
    folder = Path(folder)
    stem = "data_batch" if split == "train" else "test_batch"
    files = sorted(folder.glob(f"{stem}*.bin"))
    reader = read_cifar_binary
    if not files:
        files = sorted(p for p in folder.glob(f"{stem}*") if p.suffix == "" and p.is_file())
        reader = read_cifar_pickle
    if not files:
        raise FileNotFoundError(f"{folder}: no CIFAR-10 {split} batches ({stem}*.bin binary or {stem}* python pickles)")
    parts = [reader(p) for p in files]
    return ImageSplit(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


# ----------------------------------------------------------------------------------- Tiny ImageNet
class _Tree:
    """Uniform read access to the Tiny ImageNet layout inside a folder or a zip file."""

    def __init__(self, root: Path):
        self.zip = None
        zips = sorted(root.glob("*.zip")) if root.is_dir() else ([root] if root.suffix == ".zip" else [])
        base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
        if (base / "wnids.txt").is_file():
            self.base, self.kind = base, "dir"
        elif zips:
            try:
                self.zip = zipfile.ZipFile(zips[0])
            except zipfile.BadZipFile as e:
                raise DataFormatError(f"{zips[0]}: not a readable zip file ({e})") from None
            names = self.zip.namelist()
            w = [n for n in names if n.endswith("wnids.txt")]
            if not w:
                raise DataFormatError(f"{zips[0]}: no wnids.txt inside; expected the tiny-imagenet-200/ layout")
            self.prefix, self.kind, self.names = w[0][: -len("wnids.txt")], "zip", set(names)
            self.where = zips[0]
            return
        else:
            raise FileNotFoundError(f"{root}: neither a tiny-imagenet-200 folder with wnids.txt nor a zip of it")
        self.where = self.base

    def exists(self, rel: str) -> bool:
        return (self.prefix + rel) in self.names if self.kind == "zip" else (self.base / rel).exists()

    def read(self, rel: str) -> bytes:
        if self.kind == "zip":
            if self.prefix + rel not in self.names:
                raise FileNotFoundError(f"{self.where}: no {self.prefix + rel} inside (expected the tiny-imagenet-200/ layout)")
            try:
                return self.zip.read(self.prefix + rel)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:    # a damaged member (bad CRC, cut stream)
                raise DataFormatError(f"{self.where}: cannot read {self.prefix + rel} ({e})") from None
        return (self.base / rel).read_bytes()

    def list(self, rel_dir: str) -> list[str]:
        if self.kind == "zip":
            p = self.prefix + rel_dir.rstrip("/") + "/"
            return sorted(n[len(self.prefix):] for n in self.names if n.startswith(p) and not n.endswith("/")
                          and "/" not in n[len(p):])
        d = self.base / rel_dir
        return sorted(f"{rel_dir.rstrip('/')}/{p.name}" for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")  # 168 of the val images are grayscale ("L")
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(f"{name}: cannot decode image ({e})") from None
    return np.asarray(img, dtype=np.uint8)


def _val_annotations(tree: _Tree, index: dict) -> list:
    """``(file name, class index)`` of each line of val/val_annotations.txt (tab-separated: file, wnid,
    bbox); DataFormatError naming the file and line for a line without a wnid or with one not in wnids.txt."""
    where = f"{tree.where}:val/val_annotations.txt"
    val = []
    for number, line in enumerate(tree.read("val/val_annotations.txt").decode().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataFormatError(f"{where} line {number}: expected tab-separated file name and wnid, got {line!r}")
        if fields[1] not in index:
            raise DataFormatError(f"{where} line {number}: wnid {fields[1]!r} of {fields[0]} is not in wnids.txt")
        val.append((fields[0], index[fields[1]]))
    return val


def load_tiny_imagenet(root: str | os.PathLike, split: str, *, limit: Optional[int] = None) -> ImageSplit:
    """Tiny ImageNet (64x64 RGB, 200 classes; class index = line of the wnid in wnids.txt).

    With a ``train/`` folder present, 'train' is that split (its classes in turn, so that the first images
    of it, e.g. --subset, cover every class) and 'test' the official val split. The copy
    in shared/data holds only the val split (10,000 images), so there 'test' is the first 1,000 val images
    (exactly those of ``val_first1000_*.npy``) and 'train' the other 9,000.
    """
    tree = _Tree(Path(root))
    wnids = tree.read("wnids.txt").decode().split()
    index = {w: i for i, w in enumerate(wnids)}
    val = _val_annotations(tree, index)
    has_train = any(tree.exists(f"train/{w}/images") or tree.list(f"train/{w}/images") for w in wnids[:1])
    if has_train and split == "train":
        # class by class in turn (each class's first image, then each class's second, ...): the folders
        # hold one class each, and --subset takes the first images, which class by class in a row would
        # be only the first classes
        per_class = [[(f, index[w]) for f in tree.list(f"train/{w}/images")] for w in wnids]
        items = [c[k] for k in range(max(map(len, per_class), default=0)) for c in per_class if k < len(c)]
    else:
        items = [(f"val/images/{f}", c) for f, c in val]
        if not has_train:
            items = items[:1000] if split == "test" else items[1000:]
    if limit is not None:
        items = items[:limit]
    imgs = np.stack([_decode(tree.read(f), f"{tree.where}:{f}") for f, _ in items])
    if imgs.shape[1:] != (64, 64, 3):
        raise DataFormatError(f"{tree.where}: images are {imgs.shape[1:]}, expected 64x64 RGB")
    labels = np.array([c for _, c in items], dtype=np.int64)
    return ImageSplit(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))


def load_tiny_imagenet_npy(root: str | os.PathLike) -> ImageSplit:
    """The pre-decoded first 1,000 val images: ``val_first1000_uint8_nhwc.npy`` (1000, 64, 64, 3) + labels."""
    root = Path(root)
    ip, lp = root / "val_first1000_uint8_nhwc.npy", root / "val_first1000_labels.npy"
    for p in (ip, lp):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found")
    imgs, labels = np.load(ip), np.load(lp)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] != 3:
        raise DataFormatError(f"{ip}: expected uint8 (N, H, W, 3), got {imgs.dtype} {imgs.shape}")
    if labels.shape != (imgs.shape[0],):
        raise DataFormatError(f"{lp}: expected shape ({imgs.shape[0]},), got {labels.shape}")
    return ImageSplit(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels.astype(np.int64)))


# ------------------------------------------------------------------------------------ dispatcher
def dataset_folder(dataset: str, data_root: str | os.PathLike | None = None) -> Path:
    """``data_root/FOLDERS[dataset]``; ``FileNotFoundError`` naming it when it does not exist (a
    command checks this before it creates its run folder)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    folder = Path(data_root if data_root is not None else default_data_root()) / FOLDERS[dataset]
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: data folder for {dataset} not found (set --data-root)")
    return folder


def load_split(dataset: str, split: str, data_root: str | os.PathLike | None = None) -> ImageSplit:
    """``dataset`` in DATASETS, ``split`` in {'train', 'test'}; files under ``data_root/FOLDERS[dataset]``."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    folder = dataset_folder(dataset, data_root)
    if dataset in ("mnist", "fashion-mnist"):
        data = load_idx_dataset(folder, split)
    elif dataset == "cifar10":
        data = load_cifar10(folder, split)
    else:
        data = load_tiny_imagenet(folder, split)
    # the classifiers have NUM_CLASSES outputs: a label beyond them (a damaged label file, a wnids.txt
    # with other classes) would fail only later, inside the loss, without naming the data
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= NUM_CLASSES[dataset]):
        raise DataFormatError(f"{folder}: {dataset} {split} labels range over {int(data.labels.min())}.."
                              f"{int(data.labels.max())}, expected 0..{NUM_CLASSES[dataset] - 1}")
    return data


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1] (paper F.2: zero mean, unit
    variance over the data set). Accumulated in float64 over chunks to stay exact and small in memory."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        x = images[i: i + chunk].to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()
