"""Image inputs: finding them, naming them with stable ids, decoding any mode to RGB.

Ids come from the path relative to the input root, slugged for file names and
suffixed with a hash of the exact relative path, so ``a.jpg`` and ``a.png``, or
``x/a.jpg`` and ``y/a.jpg``, never collide.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.run.shards import (SHARD_SUFFIX, TAR_SEP, ShardError, broken_shard, expand_braces, is_pattern, list_shard,
                                 read_sample, sample_path, split_sample)

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class InputError(ValueError):
    """The ``--input`` itself cannot be used (missing, empty, unreadable list)."""


class ImageError(ValueError):
    """One image cannot be decoded; the message is a reason a person can act on."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One input image: its stable id, the absolute path to read, its path relative to the input root, and the root."""

    id: str
    path: str
    rel: str
    root: str = ""
    meta: str = ""  # a shard sample's metadata (its .json and .txt members), as JSON text; "" for none


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe ASCII slug: no separators, no dots at the ends, never empty."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return text[:max_len].rstrip("._-") or "x"


def image_id(rel: str) -> str:
    """Stable id of an image from its path relative to the input root."""
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{slugify(rel)}-{digest}"


def discover_images(source: Path, patterns: tuple[str, ...] = ()) -> list[ImageRef]:
    """The images named by ``--input``.

    Args:
        source: a folder (searched recursively), one image file, or a text file listing
            paths one per line (``#`` starts a comment; relative paths are relative to it).
        patterns: optional globs matched against the path relative to the root,
            e.g. ``("*.jpg", "cats/**")``; empty means every image extension.

    Raises:
        InputError: when ``source`` does not exist or a list file cannot be read.
    """
    if is_pattern(str(source)):  # webdataset shards: shards/{00000..00099}.tar
        shards = [Path(os.path.abspath(p)) for p in expand_braces(str(source))]
        if not any(s.is_file() for s in shards):
            raise InputError(f"no shard of {source} exists (looked for {shards[0]} ... {shards[-1]})")
        root = Path(os.path.commonpath([s.parent for s in shards]))
        return _unique([r for s in shards for r in shard_refs(s, root) if _wanted(r.rel, patterns)])
    if not os.path.lexists(source):
        raise InputError(f"input not found: {source}")
    source = Path(os.path.abspath(source))  # absolute, links kept: a run resolves its images from any directory
    if source.is_dir():
        root, walked = source, True
        rels = []
        wanted = IMAGE_EXTENSIONS + (SHARD_SUFFIX,)
        for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
            dirnames.sort()
            sub = os.path.relpath(dirpath, source)  # strings, not a Path per file: 100,000 of them cost seconds
            prefix = "" if sub == "." else Path(sub).as_posix() + "/"
            rels += [prefix + name for name in sorted(filenames) if name.lower().endswith(wanted)]
    elif source.suffix.lower() == SHARD_SUFFIX:
        root, walked = source.parent, False
        rels = [source.name]
    elif source.suffix.lower() in IMAGE_EXTENSIONS:
        root, walked = source.parent, False
        rels = [source.name]
    else:
        root, walked = source.parent, False
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{source}: not an image and not a readable list of paths ({err})") from None
        rels = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    refs, under = [], os.path.join(root, "")
    for rel in rels:  # a folder's paths are clean, and joined as strings; a list's are joined as ``Path`` joins them
        path = rel if os.path.isabs(rel) else under + rel if walked else str(root / rel)
        if rel.lower().endswith(SHARD_SUFFIX):  # a shard in a folder or a list: each of its samples
            refs += [r for r in shard_refs(Path(path), root) if _wanted(r.rel, patterns)]
        elif _wanted(rel, patterns):
            refs.append(ImageRef(id=image_id(rel), path=path, rel=rel, root=str(root)))
    return _unique(refs)


def _wanted(rel: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)


def _unique(refs: list[ImageRef]) -> list[ImageRef]:
    """Each image once; two paths with one id (a 48-bit hash collision) are refused rather than mixed."""
    out, seen = [], {}
    for ref in refs:
        if ref.id in seen and seen[ref.id] != ref.rel:
            raise InputError(f"image id collision between {seen[ref.id]!r} and {ref.rel!r}; rename one of them")
        if ref.id not in seen:
            seen[ref.id] = ref.rel
            out.append(ref)
    return out


def shard_refs(shard: Path, root: Path) -> list[ImageRef]:
    """A webdataset shard's samples as images (``pipeline.run.shards``); a shard that cannot be listed is one
    input, which fails with the reason when it is read."""
    rel = Path(os.path.relpath(shard, root)).as_posix()
    try:
        samples = list_shard(shard, IMAGE_EXTENSIONS)
    except ShardError:
        return [ImageRef(id=image_id(rel), path=str(shard) + TAR_SEP, rel=rel, root=str(root))]
    return [ImageRef(id=image_id(f"{rel}/{member}"), path=sample_path(shard, offset, size, member),
                     rel=f"{rel}/{member}", root=str(root), meta=json.dumps(meta, ensure_ascii=False) if meta else "")
            for member, offset, size, meta in samples]


def load_image(path: str, max_pixels: int = 150_000_000, max_side: int = 4096) -> Image.Image:
    """Decode any supported image to an 8-bit RGB PIL image.

    EXIF orientation is applied; animated images give their first frame; 16-bit,
    CMYK, palette, grayscale and alpha images are converted (alpha over white).
    Images larger than ``max_side`` are downscaled.

    Raises:
        ImageError: with a reason a person can act on.
    """
    p: Path | io.BytesIO = Path(path)
    if split_sample(path) is not None:  # a webdataset sample: its bytes, by offset, from its shard
        try:
            data = read_sample(path)
        except ShardError as err:
            raise ImageError(str(err)) from None
        size, p = len(data), io.BytesIO(data)
    elif (shard := broken_shard(path)) is not None:
        try:
            list_shard(Path(shard), IMAGE_EXTENSIONS)
        except ShardError as err:
            raise ImageError(f"the shard cannot be read: {err}") from None
        raise ImageError("the shard could not be listed when the run began; run again to list it anew")
    else:
        try:
            size = p.stat().st_size
        except OSError as err:
            raise ImageError(f"cannot read file: {err.strerror or err}") from None
    if size == 0:
        raise ImageError("file is empty (0 bytes)")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.seek(0)
                if im.width * im.height > max_pixels:
                    raise ImageError(f"image is {im.width}x{im.height}, over the limit of {max_pixels} pixels")
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale when huge
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im), max_side)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image, or a format that cannot be decoded") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image too large to decode safely ({err})") from None
    except PermissionError:
        raise ImageError("permission denied: the file is not readable") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"truncated or corrupt image data ({err})") from None
    except Exception as err:  # a decoder plugin's own failure (another library may have patched Image.open)
        raise ImageError(f"cannot be decoded ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _to_rgb(im: Image.Image, max_side: int) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    rgb = im.convert("RGB")
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.LANCZOS)
    return rgb


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> ``[3, R, R]`` float in [0, 1], resized (not cropped) to the model input.

    Shape:
        - Output: :math:`(3, R, R)`.
    """
    import torch  # here, not at the top: reading and listing images (export's workers too) needs no torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    x = F.interpolate(x[None], size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    return x[0].clamp_(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP's mean/std normalisation of ``[B, 3, H, W]`` images in [0, 1]."""
    import torch

    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
