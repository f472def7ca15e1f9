"""Tests of `vitaserve.models.image` against the reference tiles and pixel values (spec §1)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitaserve.errors import InvalidInput
from vitaserve.models.image import (
    decode_image,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    preprocess_frames,
    preprocess_image,
    tiles_to_pixel_values,
    video_frame_indices,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "vita15-tiny"
IMAGE_FILES = ["image0_800x600.png", "image1_300x1200.png", "image2_448x448.png"]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [decode_image((GOLDEN / name).read_bytes()) for name in IMAGE_FILES]


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "golden_outputs.safetensors")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) with a tiny IDAT: a decompression-bomb
    header without allocating the image here."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- tiling (§1.1) ----


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("max_num", [12, 1])
def test_tile_sha256_match_reference(images, index, max_num):
    meta = json.loads((GOLDEN / "tiles_meta.json").read_text())[f"image{index}_max{max_num}"]
    tiles = dynamic_preprocess(images[index], min_num=1, max_num=max_num)
    assert len(tiles) == meta["num_tiles"]
    assert all(t.size == (448, 448) and t.mode == "RGB" for t in tiles)
    hashes = [hashlib.sha256(np.asarray(t, dtype=np.uint8).tobytes()).hexdigest() for t in tiles]
    assert hashes == meta["tile_sha256_uint8_HWC"]


def test_max1_tiles_equal_reference_arrays(images):
    ref = np.load(GOLDEN / "tiles_uint8.npz")
    for i, img in enumerate(images):
        tiles = dynamic_preprocess(img, max_num=1)
        np.testing.assert_array_equal(np.stack([np.asarray(t) for t in tiles]), ref[f"image{i}_max1"])


def test_grid_choice_and_thumbnail_order():
    # 800x600 = 4:3 -> 4 columns x 3 rows; thumbnail is the whole image, last.
    img = Image.new("RGB", (800, 600))
    img.paste((255, 0, 0), (0, 0, 100, 100))  # red in tile (row 0, col 0)
    img.paste((0, 255, 0), (600, 0, 800, 100))  # green in tile (row 0, col 3)
    img.paste((0, 0, 255), (0, 500, 100, 600))  # blue in tile (row 2, col 0)
    tiles = dynamic_preprocess(img, max_num=12)
    assert len(tiles) == 13

    def centre(k: int) -> list[int]:
        return np.asarray(tiles[k])[100, 100].tolist()

    assert centre(0) == [255, 0, 0] and centre(1) == [0, 0, 0]
    assert np.asarray(tiles[3])[100, 300].tolist() == [0, 255, 0]  # row-major: index 3 = row 0, col 3
    assert np.asarray(tiles[8])[300, 100].tolist() == [0, 0, 255]  # index 8 = row 2, col 0
    assert np.asarray(tiles[-1])[20, 20].tolist() == [255, 0, 0]  # thumbnail of the whole image, last


def test_equal_ratio_tie_rule():
    grids = [(1, 1), (2, 2), (3, 3)]
    # Area 448*448*2.1 > half of 2x2 (2*448²) but not of 3x3 (4.5*448²) -> 2x2.
    side = int(448 * 2.1**0.5)
    assert find_closest_aspect_ratio(1.0, grids, side, side) == (2, 2)
    # A small square stays 1x1.
    assert find_closest_aspect_ratio(1.0, grids, 300, 300) == (1, 1)
    # Square images: 448x448 is exactly one tile (no thumbnail).
    assert len(dynamic_preprocess(Image.new("RGB", (448, 448)), max_num=12)) == 1
    # 800²: area > half of 2x2 grid (401408) but not of 3x3 (903168) -> 2x2 + thumbnail.
    assert len(dynamic_preprocess(Image.new("RGB", (800, 800)), max_num=12)) == 5
    assert len(dynamic_preprocess(Image.new("RGB", (1000, 1000)), max_num=12)) == 10  # 3x3 + thumbnail


def test_dynamic_preprocess_validates_counts():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(InvalidInput):
        dynamic_preprocess(img, min_num=0, max_num=4)
    with pytest.raises(InvalidInput):
        dynamic_preprocess(img, min_num=5, max_num=4)


def test_non_rgb_input_is_converted():
    tiles = dynamic_preprocess(Image.new("L", (500, 400), 128), max_num=1)
    assert tiles[0].mode == "RGB" and np.asarray(tiles[0])[0, 0].tolist() == [128, 128, 128]


# ---- processor (§1.2) ----


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("max_num", [12, 1])
def test_pixel_values_match_reference(images, golden, index, max_num):
    pv = preprocess_image(images[index], max_num=max_num)
    key = f"pixel_values_image{index}_max{max_num}"
    sums = golden[f"{key}_sum_per_tile_channel"]
    assert pv.dtype == torch.float32 and pv.shape == (sums.shape[0], 3, 448, 448)
    assert _rel_err(pv.double().sum(dim=(2, 3)), sums) <= 1e-6
    assert torch.equal(pv[0, :, :8], golden[f"{key}_tile0_rows0to7"])


def test_processor_resizes_shortest_edge_and_center_crops():
    # 901x600: short edge 600 -> 448, long = int(448*901/600) = int(672.75) = 672 (truncated, not
    # rounded); crop left = (672-448)//2 = 112.
    img = Image.new("RGB", (901, 600), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 450, 600))  # left half white
    pv = tiles_to_pixel_values([img])
    assert pv.shape == (1, 3, 448, 448)
    cropped = np.asarray(img.resize((672, 448), Image.Resampling.BICUBIC))[:, 112:560]
    assert torch.equal(pv, tiles_to_pixel_values([Image.fromarray(np.ascontiguousarray(cropped))]))
    white = (1.0 - 0.485) / 0.229
    assert pv[0, 0, 0, 0].item() == pytest.approx(white, rel=1e-6)


def test_processor_rejects_empty_list():
    with pytest.raises(InvalidInput):
        tiles_to_pixel_values([])
    with pytest.raises(InvalidInput):
        preprocess_frames([])


# ---- video (§1.3) ----


def test_video_30fps_10s_takes_one_frame_per_second():
    assert video_frame_indices(300, 30.0) == list(range(0, 300, 30))


def test_video_long_is_thinned_to_16_with_linspace():
    idx = video_frame_indices(60 * 30, 30.0)  # 60 candidates
    cand = list(range(0, 1800, 30))
    expected = [cand[int(p)] for p in np.linspace(0, 59, 16)]
    assert idx == expected and len(idx) == 16
    assert idx[0] == 0 and idx[-1] == 1770 and idx[1] == 90  # floor(59/15) = 3 -> frame 90


def test_video_short_repeats_frames_to_4():
    assert video_frame_indices(60, 30.0) == [0, 0, 0, 30]  # 2 s: candidates [0, 30]
    assert video_frame_indices(1, 25.0) == [0, 0, 0, 0]


def test_video_stride_uses_rounded_fps_and_includes_last_frame():
    assert video_frame_indices(121, 29.97) == [0, 30, 60, 90, 120]
    assert video_frame_indices(10, 0.2) == list(range(10))  # sub-1 fps: every frame


@pytest.mark.parametrize(
    ("n", "fps"), [(0, 30.0), (10, 0.0), (10, -1.0), (10, float("nan")), (10, float("inf"))]
)
def test_video_rejects_bad_arguments(n, fps):
    with pytest.raises(InvalidInput):
        video_frame_indices(n, fps)


def test_preprocess_frames_one_tile_per_frame():
    frames = [Image.new("RGB", (640, 360), (i * 40, 0, 0)) for i in range(3)]
    pv = preprocess_frames(frames)
    assert pv.shape == (3, 3, 448, 448)
    red = ((np.arange(3) * 40 / 255.0) - 0.485) / 0.229
    np.testing.assert_allclose(pv[:, 0, 224, 224].numpy(), red, rtol=1e-5)


# ---- decoding untrusted bytes ----


def test_decode_valid_png_and_jpeg():
    src = Image.new("RGBA", (30, 20), (10, 20, 30, 128))
    out = decode_image(_png_bytes(src))
    assert out.mode == "RGB" and out.size == (30, 20)
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 100, 50)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).size == (16, 8)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is plain text, not an image",
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    ],
    ids=["empty", "text", "random"],
)
def test_decode_rejects_garbage(data):
    with pytest.raises(InvalidInput):
        decode_image(data)


def test_decode_rejects_truncated_png():
    data = (GOLDEN / IMAGE_FILES[0]).read_bytes()
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decode_rejects_unsupported_format():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PPM")
    with pytest.raises(InvalidInput, match="unsupported"):
        decode_image(buf.getvalue())


def test_decode_enforces_max_pixels_before_decoding():
    data = _png_bytes(Image.new("RGB", (100, 100)))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(InvalidInput, match="limit"):
        decode_image(data, max_pixels=9_999)


def test_decode_rejects_decompression_bomb():
    # 50000x50000 claimed in the header: rejected before any pixel is decoded (PIL's own guard inside
    # Image.open fires first at this size).
    with pytest.raises(InvalidInput, match="too large"):
        decode_image(_png_claiming(50000, 50000))
    # Just above the default 40M limit (below PIL's own guards).
    with pytest.raises(InvalidInput, match="8000x5001"):
        decode_image(_png_claiming(8000, 5001))


def test_decode_maps_pil_bomb_guards():
    # PIL's own guards fire inside Image.open, before our header check: a warning above
    # MAX_IMAGE_PIXELS (~89M) and an error above twice that. Both must become InvalidInput.
    for width, height in ((10000, 10000), (20000, 20000)):
        with pytest.raises(InvalidInput, match="decompression bomb"):
            decode_image(_png_claiming(width, height), max_pixels=10**12)


def test_decode_real_compressed_bomb():
    # A genuine highly compressible 1-bit PNG: 6000x7000 = 42M pixels, a few KB on disk.
    data = _png_bytes(Image.new("1", (6000, 7000)))
    assert len(data) < 50_000
    with pytest.raises(InvalidInput, match="6000x7000"):
        decode_image(data)
