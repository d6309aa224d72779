"""Readers (integrations.common.datasets), preparation and tiling of integrations.mosaic (no setperm needed)."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from integrations.common.datasets import (DataFormatError, channel_stats, load_cifar10, load_idx_dataset, load_split,
                                          load_tiny_imagenet, load_tiny_imagenet_npy, read_cifar_binary, read_idx)
from integrations.mosaic.tiles import (assemble, gather_positions, mosaic_size, prepare_images, random_permutations,
                                       shuffle_tiles, target_index, to_tiles)

DATA = Path(os.environ.get("SETPERM_DATA_ROOT", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


def need(sub: str) -> Path:
    p = DATA / sub
    if not p.exists():
        pytest.skip(f"shared data folder {p} is absent (set SETPERM_DATA_ROOT)")
    return p


def _idx_bytes(magic: int, dims, body: bytes) -> bytes:
    return b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims)) + body


# ---------------------------------------------------------------------------------------- IDX
def test_mnist_reader_real_files():
    folder = need("mnist")
    test = load_idx_dataset(folder, "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first MNIST test labels
    assert torch.bincount(test.labels, minlength=10).sum() == 10000
    # the README's published training-set mean 0.1307 (used by everyone as the MNIST constant)
    mean, std = channel_stats(load_idx_dataset(folder, "train").images[:60000])
    torch.testing.assert_close(mean, torch.tensor([0.1307]), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.tensor([0.3081]), atol=1e-4, rtol=0)


def test_fashion_mnist_reader_real_files():
    test = load_split("fashion-mnist", "test", need(""))
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


def test_idx_wrong_magic_names_file(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(_idx_bytes(2049, (1, 2, 2), bytes(4)))  # a labels magic in an images file
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte\.gz.*magic number 2049, expected 2051"):
        read_idx(p, expect_magic=2051)


def test_idx_truncated_names_file(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(_idx_bytes(2051, (3, 28, 28), bytes(2 * 28 * 28)))  # 2 of the 3 images
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz.*1568 bytes, expected 2352"):
        read_idx(p, expect_magic=2051)
    # a truncated gzip stream (the file cut in the middle) is reported as well
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz"):
        read_idx(p, expect_magic=2051)


def test_idx_damaged_gzip_stream_names_file(tmp_path):
    """A damaged deflate stream (zlib.error, neither OSError nor EOFError) is a DataFormatError naming the file."""
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    # few grey levels: Huffman-coded blocks, whose damage zlib detects (raw stored blocks would pass to the CRC)
    body = np.random.default_rng(0).integers(0, 4, 4 * 28 * 28, dtype=np.uint8).tobytes()
    raw = bytearray(gzip.compress(_idx_bytes(2051, (4, 28, 28), body)))
    raw[40:104] = b"\xff" * 64
    p.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte\.gz: cannot decompress"):
        read_idx(p, expect_magic=2051)


def test_labels_beyond_the_classes_name_the_data(tmp_path):
    """A label file of the right length and magic but labels outside 0..9 is refused where it is read."""
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    (root / "mnist" / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(2051, imgs.shape, imgs.tobytes()))
    (root / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, (3,), bytes([3, 200, 1])))
    with pytest.raises(DataFormatError, match=r"mnist test labels range over 1\.\.200, expected 0\.\.9"):
        load_split("mnist", "test", root)
    (root / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, (3,), bytes([3, 9, 1])))
    assert load_split("mnist", "test", root).labels.tolist() == [3, 9, 1]


def test_idx_roundtrip_and_missing(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(2051, imgs.shape, imgs.tobytes()))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, (5,), bytes([3, 1, 4, 1, 5])))
    split = load_idx_dataset(tmp_path, "test")
    assert torch.equal(split.images[:, 0], torch.from_numpy(imgs))
    assert split.labels.tolist() == [3, 1, 4, 1, 5]


# -------------------------------------------------------------------------------------- CIFAR-10
def test_cifar_binary_and_pickle_agree(tmp_path):
    folder = need("cifar10")
    test = load_cifar10(folder, "test")
    assert test.images.shape == (1000, 3, 32, 32)
    assert test.labels[:5].tolist() == [3, 8, 8, 0, 6]  # cat, ship, ship, airplane, frog
    train = load_cifar10(folder, "train")
    assert train.labels[:4].tolist() == [6, 9, 9, 4]  # frog, truck, truck, deer
    # the python pickled layout of the same images reads back identically
    py = tmp_path / "py"
    py.mkdir()
    with open(py / "test_batch", "wb") as f:
        pickle.dump({b"data": test.images[:50].reshape(50, -1).numpy(), b"labels": test.labels[:50].tolist()}, f)
    back = load_cifar10(py, "test")
    assert torch.equal(back.images, test.images[:50]) and torch.equal(back.labels, test.labels[:50])


def test_cifar_truncated_binary(tmp_path):
    p = tmp_path / "test_batch.bin"
    p.write_bytes(bytes(3073 * 2 - 5))
    with pytest.raises(DataFormatError, match=r"test_batch\.bin.*3073"):
        read_cifar_binary(p)


# --------------------------------------------------------------------------------- Tiny ImageNet
def test_tiny_imagenet_zip_matches_npy():
    folder = need("tiny-imagenet-200")
    npy = load_tiny_imagenet_npy(folder)
    assert npy.images.shape == (1000, 3, 64, 64)
    zipped = load_tiny_imagenet(folder, "test", limit=40)
    assert zipped.images.shape == (40, 3, 64, 64)
    assert torch.equal(zipped.labels, npy.labels[:40])
    # JPEG decoders may differ in the last bit between Pillow builds; the README's npy used Pillow too
    diff = (zipped.images.float() - npy.images[:40].float()).abs().mean()
    assert diff < 1.0
    assert 0 <= int(npy.labels.min()) and int(npy.labels.max()) < 200


def _tiny_folder(root: Path, wnids, annotations: str) -> Path:
    """A tiny-imagenet-200 folder with val images val_0.JPEG.. of solid grey (one per annotation line)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n", encoding="utf-8")
    (base / "val" / "val_annotations.txt").write_text(annotations, encoding="utf-8")
    for i in range(len(annotations.splitlines())):
        Image.new("L", (64, 64), 10 * i).save(base / "val" / "images" / f"val_{i}.JPEG")
    return root


@pytest.mark.parametrize("line, reason", [("val_1.JPEG\tn09999999\t0\t0\t63\t63", r"wnid 'n09999999' of val_1\.JPEG is not in wnids"),
                                          ("val_1.JPEG n00000002 0 0 63 63", r"expected tab-separated")])
def test_tiny_imagenet_bad_annotation_line_names_file_and_line(tmp_path, line, reason):
    root = _tiny_folder(tmp_path, ["n00000001", "n00000002"], f"val_0.JPEG\tn00000002\t0\t0\t63\t63\n{line}\n")
    with pytest.raises(DataFormatError, match=r"val_annotations\.txt line 2: " + reason):
        load_tiny_imagenet(root, "test")
    # the well-formed file reads, grayscale JPEGs as RGB, the class index the line of the wnid
    root = _tiny_folder(tmp_path / "ok", ["n00000001", "n00000002"],
                        "val_0.JPEG\tn00000002\t0\t0\t63\t63\nval_1.JPEG\tn00000001\t0\t0\t63\t63\n")
    split = load_tiny_imagenet(root, "test")
    assert split.images.shape == (2, 3, 64, 64) and split.labels.tolist() == [1, 0]


def test_tiny_imagenet_train_split_takes_the_classes_in_turn(tmp_path):
    """With the official train/<wnid>/images folders, the first images of the split (--subset) cover every
    class rather than the first classes only; every image is there once, with its folder's class."""
    from PIL import Image

    wnids = ["n00000001", "n00000002", "n00000003"]
    root = _tiny_folder(tmp_path, wnids, "val_0.JPEG\tn00000002\t0\t0\t63\t63\n")
    for c, w in enumerate(wnids):
        (root / "tiny-imagenet-200" / "train" / w / "images").mkdir(parents=True)
        for k in range(4 - c):                      # 4, 3 and 2 images, grey level = 100 * class
            Image.new("L", (64, 64), 100 * c).save(root / "tiny-imagenet-200" / "train" / w / "images" / f"{w}_{k}.JPEG")
    train = load_tiny_imagenet(root, "train")
    assert len(train) == 9 and torch.bincount(train.labels).tolist() == [4, 3, 2]
    assert sorted(train.take(3).labels.tolist()) == [0, 1, 2]
    # each image keeps the class of its folder
    assert torch.allclose(train.images.float().mean(dim=(1, 2, 3)), 100.0 * train.labels.float(), atol=2)
    assert load_tiny_imagenet(root, "test").labels.tolist() == [1]      # the val split


def test_tiny_imagenet_zip_without_an_annotated_image_names_zip_and_member(tmp_path):
    import zipfile

    root = _tiny_folder(tmp_path / "src", ["n00000001"], "val_0.JPEG\tn00000001\t0\t0\t63\t63\n"
                                                         "val_1.JPEG\tn00000001\t0\t0\t63\t63\n")
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "tiny.zip", "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.name != "val_1.JPEG":
                z.write(f, f.relative_to(root).as_posix())
    with pytest.raises(FileNotFoundError, match=r"tiny\.zip: no tiny-imagenet-200/val/images/val_1\.JPEG inside"):
        load_tiny_imagenet(tmp_path / "z", "test")


# ------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_tile_assemble_identity_exact(n):
    x = torch.randn(4, 3, 7 * n, 7 * n)
    tiles = to_tiles(x, n)
    assert tiles.shape == (4, n * n, 3, 7, 7)
    assert torch.equal(assemble(tiles), x)
    # row-major positions: tile k = r*n + c is the block at row r, column c
    r, c = divmod(n * n - 1, n)
    assert torch.equal(tiles[:, -1], x[:, :, 7 * r: 7 * r + 7, 7 * c: 7 * c + 7])


def test_shuffle_and_target_index_invert():
    g = torch.Generator().manual_seed(0)
    tiles = torch.randn(6, 9, 1, 4, 4)
    perm = random_permutations(6, 9, g)
    shuffled = shuffle_tiles(tiles, perm)
    assert torch.equal(gather_positions(shuffled, target_index(perm)), tiles)
    # the target permutation matrix P[b, i, perm[b, i]] = 1 maps shuffled tiles back (y = P^T x)
    P = torch.zeros(6, 9, 9).scatter_(2, perm.unsqueeze(2), 1.0)
    y = torch.einsum("bik,bi...->bk...", P, shuffled)
    torch.testing.assert_close(y, tiles, rtol=0, atol=0)


def test_prepare_images_sizes_and_normalisation():
    imgs = torch.randint(0, 256, (10, 3, 40, 32), dtype=torch.uint8)
    mean, std = channel_stats(imgs)
    out = prepare_images(imgs, 3, mean, std)
    assert out.shape == (10, 3, 33, 33)  # centre crop 32x32, then the nearest bigger multiple of 3
    assert mosaic_size(28, 3) == 30 and mosaic_size(28, 4) == 28 and mosaic_size(64, 5) == 65
    same = prepare_images(imgs, 2, mean, std)  # 32 divisible by 2: no resampling, exact normalisation
    expect = (imgs[:, :, 4:36].float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    torch.testing.assert_close(same, expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(same.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=0.05)
