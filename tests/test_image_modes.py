"""Every image mode and bit depth PIL opens either loads correctly or is refused naming the file (issue 11, item 8).

Palette PNGs used to load as one grey channel (the palette index's luminance), 16-bit images saturated
to white, 32-bit integer and float images were clamped, and transparent pixels took whatever colour
the file stored under them -- all silently. Each case below writes one small image with PIL, loads it
through ``imagefolder`` and compares the pixels with values known independently: the numbers put in,
the palette entries, a 16-bit value over 65535, PIL's own ``convert("RGB")`` for colour spaces whose
formula is PIL's (CMYK, YCbCr), LittleCMS (``ImageCms``) for CIELAB, and ``colorsys`` for HSV.
"""

from __future__ import annotations

import colorsys
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from fedsim.data import load_dataset
from fedsim.errors import ScenarioError
from fedsim.scenario import DataSpec

W, H = 4, 3
VALUES = np.arange(W * H, dtype=np.uint8).reshape(H, W) * 21  # 0..231, every pixel different
COLOURS = [(255, 0, 0), (0, 200, 0), (10, 20, 250), (255, 255, 0), (7, 7, 7), (128, 64, 32)]
INDEX = (np.arange(W * H) % len(COLOURS)).reshape(H, W).astype(np.uint8)


def _load(tmp_path: Path, image: Image.Image, fmt: str = "PNG", **save) -> np.ndarray:
    """Write ``image`` as the one train (and test) example of an imagefolder; its pixels as loaded, (C, H, W)."""
    ext = {"PNG": "png", "TIFF": "tif", "JPEG": "jpg", "GIF": "gif"}[fmt]
    for split in ("train", "test"):
        folder = tmp_path / "data" / split / "a"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img.{ext}", format=fmt, **save)
    bundle = load_dataset(DataSpec(dataset="imagefolder", root=str(tmp_path / "data")))
    x = bundle.train_x[0].numpy()
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    return x


def _palette_image(mode: str = "P") -> Image.Image:
    im = Image.frombytes("P", (W, H), INDEX.tobytes())  # the index values, then our own palette
    im.putpalette([c for rgb in COLOURS for c in rgb])
    return im


def _expected_palette() -> np.ndarray:
    return np.array(COLOURS, dtype=np.float32)[INDEX].transpose(2, 0, 1) / 255


def test_grey_modes_load_as_one_channel(tmp_path: Path) -> None:
    got = _load(tmp_path / "L", Image.fromarray(VALUES))
    np.testing.assert_allclose(got, VALUES[None] / 255, atol=1e-7)
    bits = (VALUES > 100).astype(np.uint8) * 255
    got = _load(tmp_path / "1", Image.fromarray(bits).convert("1"))
    np.testing.assert_array_equal(got, (VALUES[None] > 100).astype(np.float32))
    opaque = Image.merge("LA", [Image.fromarray(VALUES), Image.new("L", (W, H), 255)])
    np.testing.assert_allclose(_load(tmp_path / "LA", opaque), VALUES[None] / 255, atol=1e-7)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16_bit_grey_keeps_its_range(tmp_path: Path, mode: str, fmt: str) -> None:
    values = (np.arange(W * H).reshape(H, W) * 5957).astype(np.uint16)  # up to 65527: old code saturated >= 255
    im = Image.new(mode, (W, H))
    for (r, c), v in np.ndenumerate(values):
        im.putpixel((c, r), int(v))
    got = _load(tmp_path, im, fmt)
    assert got.shape == (1, H, W)
    np.testing.assert_allclose(got, values[None] / 65535, atol=1e-6)


def test_a_16_bit_rgb_png_loads_in_its_full_range(tmp_path: Path) -> None:
    """PIL cannot write 16-bit RGB, so the PNG is assembled by hand (IHDR bit depth 16, colour type 2)."""
    rgb = (np.arange(W * H * 3).reshape(H, W, 3) * 1800 + 700).astype(">u2")
    rows = b"".join(b"\x00" + rgb[r].tobytes() for r in range(H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "img.png").write_bytes(png)
    x = load_dataset(DataSpec(dataset="imagefolder", root=str(tmp_path))).train_x[0].numpy()
    np.testing.assert_allclose(x, rgb.transpose(2, 0, 1) / 65535, atol=1 / 255)  # 8 bits kept of 16


def test_palette_png_loads_its_colours(tmp_path: Path) -> None:
    got = _load(tmp_path, _palette_image())
    assert got.shape == (3, H, W), "a palette image is colour, not one grey channel"
    np.testing.assert_allclose(got, _expected_palette(), atol=1e-7)


def test_palette_with_an_unused_transparent_index_loads(tmp_path: Path) -> None:
    im = _palette_image()
    got = _load(tmp_path, im, transparency=200)  # index 200 is not used by any pixel
    np.testing.assert_allclose(got, _expected_palette(), atol=1e-7)


def test_rgb_rgba_cmyk_ycbcr(tmp_path: Path) -> None:
    rgb = np.array(COLOURS, dtype=np.uint8)[INDEX]
    np.testing.assert_allclose(_load(tmp_path / "rgb", Image.fromarray(rgb)), rgb.transpose(2, 0, 1) / 255)
    rgba = Image.fromarray(np.dstack([rgb, np.full((H, W), 255, np.uint8)]))
    np.testing.assert_allclose(_load(tmp_path / "rgba", rgba), rgb.transpose(2, 0, 1) / 255)
    cmyk = Image.new("CMYK", (W, H), (0, 255, 255, 0))  # pure red in any CMYK -> RGB rule
    np.testing.assert_allclose(_load(tmp_path / "cmyk", cmyk, "TIFF"), np.array([1.0, 0, 0])[:, None, None]
                               * np.ones((3, H, W)))
    for mode, fmt in (("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("CMYK", "JPEG")):
        image = Image.fromarray(rgb).convert(mode)
        folder = tmp_path / f"{mode}-{fmt}"
        got = _load(folder, image, fmt)
        with Image.open(next((folder / "data" / "train" / "a").iterdir())) as written:
            assert written.mode == mode
            expected = np.asarray(written.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
        np.testing.assert_allclose(got, expected, atol=1e-7)


def test_cielab_is_converted_like_littlecms_does(tmp_path: Path) -> None:
    rgb = Image.fromarray(np.array(COLOURS, dtype=np.uint8)[INDEX])
    srgb, lab_profile = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    lab = ImageCms.applyTransform(rgb, ImageCms.buildTransform(srgb, lab_profile, "RGB", "LAB"))
    got = _load(tmp_path, lab, "TIFF")
    back = ImageCms.applyTransform(lab, ImageCms.buildTransform(lab_profile, srgb, "LAB", "RGB"))
    np.testing.assert_allclose(got, np.asarray(back, dtype=np.float32).transpose(2, 0, 1) / 255, atol=1.5 / 255)


def test_hsv_in_memory_is_converted_like_colorsys() -> None:
    """No file format stores HSV, so the decoder is called on the image PIL would hand it."""
    from fedsim.data.images import decode_image

    hsv = np.array([[0, 255, 255], [85, 255, 200], [170, 128, 255], [20, 0, 90]], dtype=np.uint8)[None]
    got = decode_image(Image.frombytes("HSV", (4, 1), hsv.tobytes()), "mem.hsv")
    expected = np.array([colorsys.hsv_to_rgb(*(hsv[0, i] / 255)) for i in range(4)], dtype=np.float32)
    np.testing.assert_allclose(got[:, 0, :].T, expected, atol=1.5 / 255)


def test_mixed_grey_and_colour_images_become_rgb_with_grey_replicated(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    Image.fromarray(VALUES).save(root / "train" / "a" / "grey.png")
    _palette_image().save(root / "train" / "b" / "colour.png")
    Image.fromarray(VALUES).save(root / "train" / "a" / "grey2.png")
    _palette_image().save(root / "train" / "b" / "colour2.png")
    bundle = load_dataset(DataSpec(dataset="imagefolder", root=str(root), test_fraction=0.5))
    x = np.concatenate([bundle.train_x.numpy(), bundle.test_x.numpy()])
    assert x.shape[1] == 3
    greys = [img for img in x if np.allclose(img[0], img[1]) and np.allclose(img[1], img[2])]
    assert greys and np.allclose(greys[0][0], VALUES / 255)


def _refused(tmp_path: Path, image: Image.Image, fmt: str, match: str, **save) -> None:
    with pytest.raises(ScenarioError, match=match) as err:
        _load(tmp_path, image, fmt, **save)
    assert "img." in str(err.value) and err.value.path == "data.root"  # names the file


def test_transparent_pixels_are_refused_naming_the_file(tmp_path: Path) -> None:
    la = Image.merge("LA", [Image.fromarray(VALUES), Image.fromarray((VALUES > 50).astype(np.uint8) * 255)])
    _refused(tmp_path / "la", la, "PNG", "transparent")
    rgba = Image.new("RGBA", (W, H), (10, 20, 30, 0))
    _refused(tmp_path / "rgba", rgba, "PNG", "transparent")
    _refused(tmp_path / "p", _palette_image(), "PNG", "transparent", transparency=0)  # index 0 is used
    grey_key = Image.fromarray(VALUES)
    _refused(tmp_path / "lkey", grey_key, "PNG", "transparent", transparency=0)  # tRNS colour key on grey
    pa = _palette_image().convert("PA")
    pa.putalpha(Image.new("L", (W, H), 0))
    _refused(tmp_path / "pa", pa, "TIFF", "transparent")


def test_modes_without_a_white_level_are_refused_naming_the_file(tmp_path: Path) -> None:
    _refused(tmp_path / "i32", Image.new("I", (W, H), 70000), "TIFF", "mode I")
    _refused(tmp_path / "f", Image.new("F", (W, H), 0.5), "TIFF", "mode F")


def test_an_animated_image_is_refused_naming_the_file(tmp_path: Path) -> None:
    frames = [_palette_image(), Image.fromarray(VALUES).convert("P")]
    _refused(tmp_path / "apng", frames[0], "PNG", "frames", save_all=True, append_images=frames[1:])
    _refused(tmp_path / "tiff", frames[0], "TIFF", "frames", save_all=True, append_images=frames[1:])


def test_a_colour_test_image_is_refused_for_a_grey_train_set(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
    Image.fromarray(VALUES).save(root / "train" / "a" / "g.png")
    _palette_image().save(root / "test" / "a" / "img.png")
    with pytest.raises(ScenarioError, match=r"img\.png.*colour"):
        load_dataset(DataSpec(dataset="imagefolder", root=str(root)))


def test_build_assets_decodes_source_images_the_same_way(tmp_path: Path) -> None:
    """The bundled-data builder reads the foolbox PNGs through the same decoder: a palette PNG keeps its colours
    (it used to become its palette indices), and a file it did not write in --out is never overwritten."""
    import zipfile

    from fedsim.data.build_assets import check_targets, foolbox_images

    wheel = tmp_path / "foolbox-fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for i in range(20):
            buf = tmp_path / "p.png"
            _palette_image().save(buf)
            zf.writestr(f"foolbox/data/cifar10_{i:02d}_{i % 10}.png", buf.read_bytes())
    x, y = foolbox_images(wheel, "cifar10", 3)
    assert x.dtype == np.uint8 and x.shape == (20, 3, H, W) and y.tolist() == [i % 10 for i in range(20)]
    np.testing.assert_array_equal(x[0], np.array(COLOURS, dtype=np.uint8)[INDEX].transpose(2, 0, 1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "digits.npz").write_bytes(b"mine")
    with pytest.raises(SystemExit, match="digits.npz"):
        check_targets(tmp_path / "out")
    assert (tmp_path / "out" / "digits.npz").read_bytes() == b"mine"


def test_an_image_the_folder_scan_would_skip_is_refused_not_dropped(tmp_path: Path) -> None:
    """A .gif beside .png files: torchvision's scan skips it, so the dataset silently had one example fewer
    than the user gave; now validation names the file. A non-image file (notes.txt) is not data and is ignored."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        Image.fromarray(VALUES).save(root / "train" / cls / "x.png")
        Image.fromarray(VALUES).save(root / "train" / cls / "y.png")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    spec = DataSpec(dataset="imagefolder", root=str(root), test_fraction=0.5)
    assert load_dataset(spec).num_train + len(load_dataset(spec).test_x) == 4  # the .txt is no example
    Image.fromarray(VALUES).save(root / "train" / "b" / "z.gif")
    with pytest.raises(ScenarioError, match=r"z\.gif is an image of a kind the folder scan skips") as err:
        load_dataset(spec)
    assert err.value.path == "data.root"
