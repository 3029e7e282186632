"""Image files named by the data: kept inside their image directory, checked before use, size-limited.

A COCO ``file_name`` or a POPE question's ``image`` is a name relative to the image directory.
:func:`resolve_image` refuses names that leave it (``../x``, ``/etc/shadow``, a symlink out) unless
``allow_outside_image_dir=True`` (``--allow-outside-image-dir``). :func:`check_image` reads an
image's header only (cheap: runners check every image before the first batch, so a missing or
broken file is reported before any work is done); :func:`open_image` decodes it as RGB. Both
refuse images with more than ``max_image_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`, PIL's
own limit) with a message naming the file, the limit and how to raise it, instead of PIL's
``DecompressionBombError``.

Example
-------
>>> resolve_image("world/images", "000001.png")                         # doctest: +SKIP
PosixPath('world/images/000001.png')
>>> resolve_image("world/images", "../../etc/shadow")                   # doctest: +SKIP
Traceback (most recent call last):
DataError: image '../../etc/shadow' is outside the image directory world/images ...
>>> check_image("world/images/000001.png")                              # doctest: +SKIP
(64, 64)
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Iterator

from .coco import DataError

#: Default pixel limit (width x height) of an image: PIL's own ``Image.MAX_IMAGE_PIXELS``
#: (about 89.5 megapixels; PIL raises ``DecompressionBombError`` at twice that).
MAX_IMAGE_PIXELS = 89_478_485

_PIL_LIMIT_LOCK = threading.Lock()


def resolve_image(image_dir: str | Path, name: str, allow_outside_image_dir: bool = False,
                  source: str | None = None) -> Path:
    """``image_dir / name``, refusing a ``name`` that leads outside ``image_dir`` (unless allowed).

    ``name`` must be a relative path without ``..`` that stays inside ``image_dir`` once symlinks
    are resolved. ``source`` (e.g. ``"instances.json, image id 7"``) is named in the error.

    Example
    -------
    >>> resolve_image("images", "a/b.png")
    PosixPath('images/a/b.png')
    """
    image_dir = Path(image_dir)
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise DataError(f"{source or 'image'}: the image file name must be a non-empty string, got {name!r}.")
    path = image_dir / name
    if allow_outside_image_dir:
        return path
    pure = PurePath(name)
    outside = pure.is_absolute() or ".." in pure.parts
    if not outside:
        try:
            path.resolve().relative_to(image_dir.resolve())
        except ValueError:  # a symlink inside the folder that points out of it
            outside = True
    if outside:
        where = f"{source}: " if source else ""
        raise DataError(f"{where}image {str(name)!r} is outside the image directory {image_dir} (an absolute path, "
                        "one with '..', or a link leading out); image names must be relative to the image directory. If you trust "
                        "this data, pass --allow-outside-image-dir (allow_outside_image_dir=True).")
    return path


def _limit_text(path: Path, size: tuple[int, int], max_image_pixels: int) -> str:
    w, h = size
    return (f"image {path} is {w}x{h} = {w * h} pixels, more than the limit of {max_image_pixels}; raise it with "
            f"--max-image-pixels {w * h} (max_image_pixels={w * h}) if you trust this file.")


@contextmanager
def _pil_unlimited() -> Iterator[None]:
    """PIL's own bomb check off (ours, with a message naming the fix, runs instead)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _open(path: Path, max_image_pixels: int | None, decode: bool):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image file not found: {path}. Check --image-dir (and the file names in the data).")
    limit = MAX_IMAGE_PIXELS if max_image_pixels is None else int(max_image_pixels)
    try:
        with _pil_unlimited():
            with Image.open(path) as im:
                size = im.size
                if size[0] * size[1] > limit:
                    raise DataError(_limit_text(path, size, limit))
                return im.convert("RGB") if decode else size
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image file PIL can decode (corrupt, or another "
                        "format); replace the file or drop the image from the data.") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged files
        raise DataError(f"cannot read image {path} ({e}); replace the file or drop the image from the data.") from None


def check_image(path: str | Path, max_image_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image file, reading its header only; ``DataError`` if it is missing,
    not an image, or larger than ``max_image_pixels`` (default :data:`MAX_IMAGE_PIXELS`).

    Example
    -------
    >>> check_image("world/images/000001.png")             # doctest: +SKIP
    (64, 64)
    """
    return _open(Path(path), max_image_pixels, decode=False)


def open_image(path: str | Path, max_image_pixels: int | None = None):
    """The image as an RGB ``PIL.Image``; the same checks as :func:`check_image`, and decoding errors.

    Example
    -------
    >>> open_image("world/images/000001.png").mode         # doctest: +SKIP
    'RGB'
    """
    return _open(Path(path), max_image_pixels, decode=True)
