"""Opening images: Pillow, EXIF orientation applied, RGB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugtune.data.loading import DataError


class ImageError(DataError):
    """An image cannot be read, or a sample's images and placeholders disagree; the message
    names the sample (when known) and the path. A :class:`~plugtune.data.loading.DataError`,
    so the CLI prints it as one clear line."""


def open_image(image: Any, sample: str | None = None):
    """A ``PIL.Image.Image`` in RGB with its EXIF orientation applied.

    Args:
        image: a path (str / ``Path``) or an already opened ``PIL.Image.Image``.
        sample: a short description of the sample, for the error message.

    Raises:
        ImageError: the file is missing or Pillow cannot decode it (names sample and path).
    """
    from PIL import Image, ImageOps

    where = f"{sample}: " if sample else ""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    if not isinstance(image, str | Path):
        raise ImageError(f"{where}expected an image path or PIL image, got {type(image).__name__}")
    path = Path(image).expanduser()
    if not path.is_file():
        raise ImageError(f"{where}image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as exc:
        raise ImageError(f"{where}cannot read image {str(path)!r}: {exc}") from None


def describe_sample(messages: list[dict], images: list) -> str:
    """``sample 'first user words...' (images: a.jpg, b.jpg)`` for error messages."""
    first = next((m["content"] for m in messages if m.get("role") == "user"), "")
    text = " ".join(str(first).split())[:60]
    names = ", ".join(str(i) for i in images[:3]) + (" ..." if len(images) > 3 else "")
    return f"sample {text!r} (images: {names or 'none'})"
