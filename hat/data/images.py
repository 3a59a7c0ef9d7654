"""Robust image loading: every failure names the file, odd-but-valid images become plain RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

# Refuse decompression bombs outright (Pillow only warns between 1x and 2x its limit).
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageLoadError(ValueError):
    """An image file is missing, unreadable, truncated or too large."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, transparency composited on white, 8-bit RGB."""
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: rescale to 8 bits instead of clipping.
        image = image.convert("F")
        scale = 255.0 / (image.getextrema()[1] or 1.0)
        return image.point(lambda v: v * scale).convert("L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Open, fully decode and convert an image, raising :class:`ImageLoadError` on any problem.

    ``min_side``: a JPEG may be decoded at the smallest of libjpeg's 1/2, 1/4 and 1/8 scales
    whose sides all stay at least this long (a query, which is resized down anyway): a 12 MP
    photograph decodes in about a third of the time, and what is left to resize is 16-64x
    smaller. Other formats, and galleries (whose stored features stay as encoded), decode whole.
    """
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(
                        path, f"{image.width}x{image.height} pixels exceeds {MAX_IMAGE_PIXELS}"
                    )
                if min_side is not None and image.format == "JPEG":
                    image.draft(image.mode, (min_side, min_side))
                image.load()
                return to_rgb(image)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, str(exc) or type(exc).__name__) from None


def list_images(root: str | Path) -> list[Path]:
    """Image files below ``root`` (recursively, by extension), in a stable sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} does not exist")
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
