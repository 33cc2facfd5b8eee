"""Decode one PIL image into float pixels in [0, 1], or refuse it naming the file.

Every mode PIL opens is handled on purpose, none by a silent default:

* grey, one channel: ``1`` (0 or 1), ``L``/``LA``/``La`` (value / 255), ``I;16``/``I;16L``/``I;16B``/``I;16N``
  (16-bit, value / 65535), and ``I`` when it came from a 16-bit PNG (older Pillow);
* colour, three channels, through PIL's own conversion to sRGB: ``RGB``/``RGBA``/``RGBa``/``RGBX``, the palette
  modes ``P``/``PA`` (the palette's colours, never the index's luminance), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``;
  16-bit RGB PNGs arrive from PIL as 8-bit ``RGB`` (its high byte);
* refused: any transparent pixel (an alpha band, a palette or colour-key transparency: what colour is under
  it is not defined, so fedsim does not guess a background), ``I`` (32-bit integers) and ``F`` (32-bit
  floats), whose white level is not defined, a mode PIL cannot convert, and animations (several frames).
"""

from __future__ import annotations

import warnings

import numpy as np

from fedsim.errors import ScenarioError

GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")
GREY_8 = ("1", "L", "LA", "La")
ALPHA_BANDS = ("A", "a")


def _refuse(name: str, why: str) -> ScenarioError:
    return ScenarioError("data.root", f"{name}: {why}")


def _check_opaque(im, name: str) -> None:  # noqa: ANN001 - a PIL image
    """Refuse an image with any pixel that is not fully opaque."""
    if not im.has_transparency_data:
        return
    bands = im.getbands()
    band = next((b for b in ALPHA_BANDS if b in bands), None)
    try:
        with warnings.catch_warnings():  # PIL's advice to convert palette transparency to RGBA: done here
            warnings.simplefilter("ignore", UserWarning)
            alpha = im.getchannel(band) if band is not None else im.convert("RGBA").getchannel("A")
    except (ValueError, OSError) as err:
        raise _refuse(name, f"its transparency (mode {im.mode}) cannot be read ({err})") from None
    if int(np.asarray(alpha).min()) < 255:
        raise _refuse(name, f"has transparent pixels (mode {im.mode}); fedsim does not guess the colour under them: "
                            "flatten the image onto a background first")


def decode_image(im, name: str) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """``im`` as float32 pixels ``(C, H, W)`` in [0, 1], C = 1 (grey modes) or 3 (colour modes).

    ``name`` (the file) is named in the :class:`~fedsim.errors.ScenarioError` (field ``data.root``) raised
    for an image that cannot be converted without guessing (see the module docstring).
    """
    if getattr(im, "n_frames", 1) > 1:
        raise _refuse(name, f"has {im.n_frames} frames (an animation or a multi-page file); save one frame per file")
    mode = im.mode
    if mode in GREY_16:
        return (np.asarray(im).astype(np.float32) / 65535.0)[None]
    if mode == "I" and im.format == "PNG":  # a 16-bit grey PNG opened by an older Pillow
        values = np.asarray(im)
        if values.min() >= 0 and values.max() <= 65535:
            return (values.astype(np.float32) / 65535.0)[None]
    if mode in ("I", "F") or mode.startswith(("I;32", "F;")):
        kind = "32-bit integer" if mode.startswith("I") else "32-bit float"
        raise _refuse(name, f"mode {mode} ({kind} pixels) has no defined white level; save it with 8 or 16 bits "
                            "per channel")
    _check_opaque(im, name)
    try:
        with warnings.catch_warnings():  # palette transparency: checked opaque above
            warnings.simplefilter("ignore", UserWarning)
            if mode in GREY_8:
                grey = im.getchannel(0) if mode == "La" else im.convert("L")
                return (np.asarray(grey, dtype=np.float32) / 255.0)[None]
            rgb = im.convert("RGB")
    except (ValueError, OSError) as err:
        raise _refuse(name, f"mode {mode} cannot be converted to RGB ({err})") from None
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def to_channels(pixels: np.ndarray, channels: int, name: str) -> np.ndarray:
    """``pixels`` (C, H, W) with ``channels`` channels: grey is repeated into RGB (lossless); colour becomes grey
    only when its three channels are equal, otherwise it is refused naming the file."""
    if pixels.shape[0] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=0)
    if np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[1], pixels[2]):
        return pixels[:1]
    raise _refuse(name, "is a colour image but the dataset is grey (the train/ images are all grey); convert it, "
                        "or add colour images to train/")
