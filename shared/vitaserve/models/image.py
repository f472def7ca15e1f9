"""Image input of VITA-1.5: safe decoding, dynamic tiling, the per-tile processor and video frame sampling.

Implements `tests/golden/vita15_architecture.md` §1:
- §1.1 `dynamic_preprocess`: choose a grid of 448×448 tiles close to the image's aspect ratio, crop the
  resized image row-major, append a thumbnail;
- §1.2 `tiles_to_pixel_values`: the InternViT CLIP-style processor (shortest-edge-448 bicubic resize,
  center crop, 1/255 rescale, ImageNet normalisation) giving float32 (N, 3, 448, 448);
- §1.3 `video_frame_indices` / `preprocess_frames`: 1 frame/s sampling clamped to 4..16 frames; frames
  are never tiled.

`decode_image` is the only entry point for untrusted bytes: it bounds the pixel count from the header
before any pixel is decoded and turns every decoder failure into `InvalidInput`.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import IMAGE_SIZE

# Formats a client may send. Restricting the plugin list keeps PIL away from decoders with external
# dependencies or a large attack surface (EPS runs Ghostscript, for example).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESCALE_FACTOR = 1.0 / 255.0
# Upper bound on a shortest-edge-resized image: an extreme aspect ratio (e.g. 1×40000) would otherwise
# blow up to billions of pixels before the center crop.
_MAX_RESIZED_PIXELS = 40_000_000

# §1.3: one frame per second, at most 16 and at least 4 frames.
VIDEO_SAMPLE_FPS = 1
MAX_VIDEO_FRAMES = 16
MIN_VIDEO_FRAMES = 4


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode untrusted image bytes to an RGB image.

    Raises `InvalidInput` for empty, corrupt, truncated or unsupported data and for images with more
    than `max_pixels` pixels; the size is checked from the header, before the pixels are decoded.
    Only the first frame of a multi-frame file (GIF, TIFF) is used. EXIF orientation is not applied,
    as in the reference.
    """
    if max_pixels < 1:
        raise InvalidInput(f"max_pixels must be >= 1, got {max_pixels}")
    if not data:
        raise InvalidInput("image data is empty")
    try:
        # PIL reports sizes above Image.MAX_IMAGE_PIXELS with a warning; make it an error so it can never
        # be ignored. catch_warnings only changes the filter list for the duration of this block.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                width, height = img.size
                _check_pixel_count(width, height, max_pixels)
                # A full load decodes every byte, so truncated files fail here rather than later.
                img.load()
                return img.convert("RGB")
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image is too large (decompression bomb guard): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidInput(
            f"unsupported or unrecognised image format (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types (OSError, ValueError,
        # SyntaxError, struct.error, IndexError, ...) for corrupt input; all of them mean bad bytes.
        raise InvalidInput(f"corrupt or truncated image data: {type(exc).__name__}: {exc}") from exc


def _check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidInput(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise InvalidInput(
            f"image is too large: {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (columns, rows) with min_num <= columns*rows <= max_num, by ascending area.

    Within one area the order is fixed (by columns); §1.1 shows the order inside an area class never
    decides the result.
    """
    grids = [
        (i, j)
        for i in range(1, max_num + 1)
        for j in range(1, max_num // i + 1)
        if min_num <= i * j <= max_num
    ]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: list[tuple[int, int]],
    width: int,
    height: int,
    image_size: int = IMAGE_SIZE,
) -> tuple[int, int]:
    """§1.1 step 2: the (columns, rows) grid whose ratio is closest to `aspect_ratio`.

    Candidates are visited in the given order. A strictly smaller difference wins; an exactly equal
    difference switches to the later (larger) grid only if the image area exceeds half the grid's area.
    """
    best_diff = math.inf
    best = (1, 1)
    area = width * height
    for i, j in target_ratios:
        diff = abs(aspect_ratio - i / j)
        if diff < best_diff:
            best_diff = diff
            best = (i, j)
        elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def dynamic_preprocess(
    img: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """§1.1: split an image into image_size² tiles (row-major), then the thumbnail if >1 tile."""
    if not 1 <= min_num <= max_num:
        raise InvalidInput(f"need max_num >= min_num >= 1, got min_num={min_num}, max_num={max_num}")
    if image_size < 1:
        raise InvalidInput(f"image_size must be >= 1, got {image_size}")
    img = _as_rgb(img)
    width, height = img.size
    cols, rows = find_closest_aspect_ratio(
        width / height, _candidate_grids(min_num, max_num), width, height, image_size
    )
    # Explicit BICUBIC = Pillow's default filter for RGB, which the reference relies on.
    resized = img.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        left = (k % cols) * image_size
        top = (k // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def _as_rgb(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise InvalidInput(f"expected a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise InvalidInput(f"image has an empty size {img.width}x{img.height}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _shortest_edge_size(width: int, height: int, short_target: int) -> tuple[int, int]:
    """§1.2 step 2: (width, height) with the short edge = target and the long edge truncated."""
    if width <= height:
        return short_target, int(short_target * height / width)
    return int(short_target * width / height), short_target


def _process_one(img: Image.Image, size: int) -> np.ndarray:
    """§1.2 for one image: resize, center crop, rescale, normalise → float32 CHW."""
    img = _as_rgb(img)
    new_w, new_h = _shortest_edge_size(img.width, img.height, size)
    if new_w * new_h > _MAX_RESIZED_PIXELS:
        raise InvalidInput(f"image {img.width}x{img.height} has too extreme an aspect ratio")
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    arr = np.asarray(img, dtype=np.uint8)[top : top + size, left : left + size]
    # The rescale is done in float64 then cast; the normalisation is done in float32 (matches the
    # transformers processor bit for bit).
    x = (arr.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def tiles_to_pixel_values(tiles: list[Image.Image], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """§1.2: process a list of images into float32 pixel values (N, 3, image_size, image_size)."""
    if not tiles:
        raise InvalidInput("no images to process")
    return torch.from_numpy(np.stack([_process_one(t, image_size) for t in tiles]))


def preprocess_image(img: Image.Image, max_num: int = 12) -> torch.Tensor:
    """Tiling (§1.1, min_num 1, thumbnail on) then the processor (§1.2): (n_tiles, 3, 448, 448)."""
    return tiles_to_pixel_values(dynamic_preprocess(img, min_num=1, max_num=max_num))


def video_frame_indices(
    n_frames: int,
    fps: float,
    max_frames: int = MAX_VIDEO_FRAMES,
    min_frames: int = MIN_VIDEO_FRAMES,
) -> list[int]:
    """§1.3: indices of the frames to use from a video of n_frames at the given average fps.

    Candidates are every round(fps)-th frame (1 frame/s) from 0 to n_frames-1. More than max_frames
    candidates are thinned, fewer than min_frames are repeated, both with floor(linspace).
    """
    if n_frames < 1:
        raise InvalidInput(f"video has no frames (n_frames={n_frames})")
    if not (math.isfinite(fps) and fps > 0):
        raise InvalidInput(f"video fps must be a positive finite number, got {fps}")
    if not 1 <= min_frames <= max_frames:
        raise InvalidInput(f"need max_frames >= min_frames >= 1, got {min_frames}, {max_frames}")
    # Below 0.5 fps round() gives 0; consecutive frames are then already >= 1 s apart, so take them all.
    stride = max(1, int(round(fps / VIDEO_SAMPLE_FPS)))
    candidates = list(range(0, n_frames, stride))
    if len(candidates) > max_frames:
        picks = np.linspace(0, len(candidates) - 1, num=max_frames).astype(int)
    elif len(candidates) < min_frames:
        picks = np.linspace(0, len(candidates) - 1, num=min_frames).astype(int)
    else:
        return candidates
    return [candidates[int(p)] for p in picks]


def preprocess_frames(frames: list[Image.Image]) -> torch.Tensor:
    """§1.3: video frames through the §1.2 processor, one tile each (no tiling): (n, 3, 448, 448)."""
    if not frames:
        raise InvalidInput("no video frames to process")
    return tiles_to_pixel_values(frames)
