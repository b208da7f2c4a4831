"""Images in and out of the routes: decoding, fitting to a model's input spec, and PNG encoding.

All decoding is Pillow's; this module only decides what to do with the decoded image and turns
Pillow's many exceptions into the API's 4xx errors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ApiError

InvertMode = Literal["auto", "true", "false"]

# The raster formats a client may send. Pillow would otherwise try every plugin it has, among them EPS,
# whose loader runs Ghostscript on the upload where it is installed (a long history of exploits), and
# a dozen scientific and legacy formats nobody sends to this API. "JPEG" also opens camera MPO files (a JPEG
# with a second, preview picture); naming "MPO" here would make Pillow fail with a KeyError.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


@dataclass(frozen=True)
class InputSpec:
    """The part of a model card that says how an arbitrary image becomes the model's input."""

    channels: int
    height: int | None  # None: dynamic (a segmenter's input keeps the image's size, padded to `stride`)
    width: int | None
    padding_value: int
    light_on_dark: bool  # the training images' polarity: light object on a dark background
    stride: int = 1  # a dynamic input's height and width must be multiples of this

    @classmethod
    def from_card(cls, card: dict) -> "InputSpec":
        spec = card["input"]
        fit = spec.get("fit", {})
        return cls(
            channels=int(spec["channels"]),
            height=spec["height"] if isinstance(spec["height"], int) else None,
            width=spec["width"] if isinstance(spec["width"], int) else None,
            padding_value=int(fit.get("padding_value", 0)),
            light_on_dark=fit.get("polarity", "light-on-dark") == "light-on-dark",
            stride=int(spec.get("stride", 1)),
        )


def configure_pillow_limits(max_pixels_per_image: int) -> None:
    """Pillow's decompression-bomb guard is process-wide; align it with our per-image limit.

    Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; turning the warning into an
    error makes both cases a clean 413 instead of a log line followed by a huge decode.
    """
    import warnings

    Image.MAX_IMAGE_PIXELS = max_pixels_per_image
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def too_many_pixels(width: int, height: int, max_pixels: int, field: str) -> ApiError:
    return ApiError(413, "too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", field)


def decode_image(data: bytes, max_pixels: int, field: str) -> Image.Image:
    """Decode the first frame of any Pillow-readable image, refusing oversized ones before decoding."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "too_many_pixels", f"image exceeds the limit of {max_pixels} pixels", field) from None
    except UnidentifiedImageError:
        raise ApiError(415, "unsupported_image",
                       "not an image in an accepted format (PNG, JPEG, BMP, GIF, WebP, TIFF, PPM)", field) from None
    except Exception as exc:  # Pillow raises many types (SyntaxError, struct.error, ...) for corrupt headers
        raise ApiError(400, "corrupt_image", f"image could not be decoded: {exc}", field) from None
    # The header gives the size; refuse before any pixel is decompressed.
    if image.width * image.height > max_pixels:
        raise too_many_pixels(image.width, image.height, max_pixels, field)
    try:
        image.seek(0)  # first frame of an animated GIF/WebP or multi-page TIFF
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_many_pixels(image.width, image.height, max_pixels, field) from None
    except Exception as exc:  # truncated data, bad compressed stream, ...
        raise ApiError(400, "corrupt_image", f"image could not be decoded: {exc}", field) from None
    return image


def to_eight_bits(image: Image.Image) -> Image.Image:
    """16-bit and float images -> 8-bit grey by their range, not by clipping.

    Pillow's convert("L") clips "I;16", "I" and "F" pixels at 255, so a 16-bit scan (0..65535) comes out
    almost white. 16-bit images are scaled by 255/65535; 32-bit integer images too when a value is above
    255 (what 16-bit TIFFs and PNGs open as in some Pillow versions), else taken as 8-bit values; float
    images whose values lie in 0..1 are scaled by 255, others clipped to 0..255.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values * (255 / 65535)
    elif image.mode == "F" and values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
        values = values * 255
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, as a viewer shows them; auto-invert then sees a light background."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def background_is_light(gray: np.ndarray) -> bool:
    """Auto-invert rule: is the image's background, its outermost frame of pixels, mostly light?

    "Light" is relative to the image's own range (above the midpoint of its darkest and lightest pixel), so a
    dark item on white or mid-grey paper reads as light background, and a light item on black as dark. The
    frame is 1/28 of the shorter side (one pixel at Fashion-MNIST's 28x28), where a photo shows its paper and
    a dataset image its background. A rule comparing the border's mean with the centre's inverted 52 of the
    10,000 Fashion-MNIST test images (44 sandals: dark gaps between light straps); this one inverts none of
    them and every one of them inverted (tests/test_images.py). A uniform image is left alone.
    """
    height, width = gray.shape
    ring = max(1, min(height, width) // 28)
    border = np.concatenate([gray[:ring].ravel(), gray[-ring:].ravel(),
                             gray[ring:-ring, :ring].ravel(), gray[ring:-ring, -ring:].ravel()])
    darkest, lightest = int(gray.min()), int(gray.max())
    if darkest == lightest:
        return False
    return float(np.mean(border > (darkest + lightest) / 2)) > 0.5


def to_model_mode(image: Image.Image, channels: int, light_on_dark: bool,
                  invert: InvertMode = "auto") -> tuple[Image.Image, bool]:
    """EXIF orientation, alpha over white, the model's colour mode and polarity; returns the image and
    whether it was inverted. Size is left alone (classifiers resize next, segmenters pad)."""
    image = ImageOps.exif_transpose(image)
    image = to_eight_bits(image)
    image = composite_on_white(image)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:  # Pillow's convert to the same mode is a copy
        image = image.convert(mode)
    if invert == "auto":
        gray = np.asarray(image if channels == 1 else image.convert("L"))
        inverted = background_is_light(gray) == light_on_dark
    else:
        inverted = invert == "true"
    if inverted:
        image = ImageOps.invert(image)
    return image, inverted


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """A PNG file of `image`: a Pillow image, or uint8 pixels [H, W] (mode L) or [H, W, 3] (RGB)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def from_chw(pixels: np.ndarray) -> np.ndarray:
    """uint8 [C, H, W] (C = 1 or 3) -> [H, W] or [H, W, 3], as Pillow takes pixels."""
    return pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))


def to_chw(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # HWC -> CHW
    return np.ascontiguousarray(pixels)


def fit_to_input_spec(image: Image.Image, spec: InputSpec, invert: InvertMode = "auto") -> tuple[np.ndarray, bool]:
    """Any decoded image -> uint8 [C, H, W] as the model was trained, and whether it was inverted.

    EXIF orientation, alpha over white, the card's colour mode, polarity, then an aspect-preserving
    resize into H x W padded with the card's padding value (padding after inversion, so it stays the
    training background).
    """
    image, inverted = to_model_mode(image, spec.channels, spec.light_on_dark, invert)
    if image.size == (spec.width, spec.height):  # already the model's size: ImageOps.pad would copy it twice
        return to_chw(image), inverted
    padding = spec.padding_value if spec.channels == 1 else (spec.padding_value,) * 3
    fitted = ImageOps.pad(image, (spec.width, spec.height), method=Image.Resampling.LANCZOS, color=padding)
    return to_chw(fitted), inverted
