"""Reading an item's media files, with errors that name the file.

Everything is checked here, before any component is called, with the model library's own decoders
(`decode_image`, `decode_audio`), so a missing, unreadable or corrupt file is an `InvalidInput` of that
item ("images[0] /data/x.png: corrupt or truncated image data ...") rather than a Triton error message.

Video: a folder of frame images (sorted by name, taken as one frame per second) or a multi-frame image file
(animated GIF/WebP, multi-page TIFF; its frame durations give the fps). Frames are sampled with the
reference's rule (`video_frame_indices`: 1 frame/s, 4..16 frames) and sent as one 448² tile each, as
PNG bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitaserve.components.base import ImageInput
from vitaserve.errors import InvalidInput
from vitaserve.models.audio import decode_audio, to_mono_16k, validate_waveform
from vitaserve.models.image import ALLOWED_FORMATS, decode_image, video_frame_indices
from vitaserve_batch.manifest import IMAGE_SUFFIXES, Item


@dataclass(frozen=True)
class ItemMedia:
    images: tuple[ImageInput, ...] = ()
    frames: tuple[ImageInput, ...] = ()
    audio: np.ndarray | None = None  # 16 kHz mono float32


def load_media(item: Item, *, max_image_bytes: int, max_audio_s: float, max_video_frames: int) -> ItemMedia:
    """Read and check every file of `item`; raises `InvalidInput` naming the first bad one."""
    max_tiles = item.max_tiles or 12
    images = []
    for k, path in enumerate(item.images):
        data = _read(path, f"images[{k}]", max_image_bytes)
        try:
            decode_image(data)
        except InvalidInput as exc:
            raise InvalidInput(f"images[{k}] {path}: {exc.message}") from None
        images.append(ImageInput(data=data, max_tiles=max_tiles))
    frames: tuple[ImageInput, ...] = ()
    if item.video:
        frames = tuple(ImageInput(data=f, max_tiles=1)
                       for f in _video_frames(item.video, max_image_bytes, max_video_frames))
    audio = None
    if item.audio:
        data = _read(item.audio, "audio", 64 * 1024 * 1024)
        try:
            samples, rate = decode_audio(data, max_seconds=max_audio_s)
            audio = to_mono_16k(samples, rate)
            validate_waveform(audio, max_seconds=max_audio_s)
        except InvalidInput as exc:
            raise InvalidInput(f"audio {item.audio}: {exc.message}") from None
    return ItemMedia(images=tuple(images), frames=frames, audio=audio)


def _read(path: str, what: str, limit: int) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise InvalidInput(f"{what} {path}: not a file")
        if size > limit:
            raise InvalidInput(f"{what} {path}: {size} bytes, more than the limit of {limit}")
        return p.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{what} {path}: no such file") from None
    except PermissionError:
        raise InvalidInput(f"{what} {path}: permission denied") from None
    except IsADirectoryError:
        raise InvalidInput(f"{what} {path}: is a folder") from None


def _video_frames(path: str, max_image_bytes: int, max_frames: int) -> list[bytes]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidInput(f"video {path}: the folder holds no frame images")
        picks = video_frame_indices(len(files), 1.0, max_frames=max_frames, min_frames=min(4, max_frames))
        out = []
        for i in picks:
            data = _read(str(files[i]), "video frame", max_image_bytes)
            try:
                decode_image(data)
            except InvalidInput as exc:
                raise InvalidInput(f"video frame {files[i]}: {exc.message}") from None
            out.append(data)
        return out
    data = _read(path, "video", max_image_bytes)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            n = getattr(img, "n_frames", 1)
            duration_ms = float(img.info.get("duration") or 1000.0)
            picks = video_frame_indices(n, 1000.0 / max(duration_ms, 1.0), max_frames=max_frames,
                                        min_frames=min(4, max_frames))
            out = []
            for i in picks:
                img.seek(i)
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                out.append(buf.getvalue())
            return out
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt input
        raise InvalidInput(f"video {path}: unreadable or corrupt ({type(exc).__name__}: {exc})") from None
