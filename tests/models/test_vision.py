"""Tests of `vitaserve.models.vision` against the tiny reference model (spec §2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import VisionConfig
from vitaserve.models.image import decode_image, preprocess_image
from vitaserve.models.vision import InternVisionModel, VisionEncoder, pixel_shuffle_features

pytestmark = pytest.mark.unit

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
TINY = GOLDEN_DIR / "vita15-tiny"
IMAGE_FILES = ["image0_800x600.png", "image1_300x1200.png", "image2_448x448.png"]
# Checkpoint prefix -> VisionEncoder state-dict prefix.
PREFIX_MAP = {"model.vision_tower.vision_tower.": "vision_tower.", "model.mm_projector.": "mm_projector."}


def _map_key(name: str) -> str | None:
    for src, dst in PREFIX_MAP.items():
        if name.startswith(src):
            return dst + name[len(src) :]
    return None


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def tiny_cfg() -> VisionConfig:
    cfgs = json.loads((TINY / "tiny_configs.json").read_text())
    return VisionConfig.from_reference(cfgs["vision_config"], cfgs["main_config"]["hidden_size"])


@pytest.fixture(scope="module")
def encoder(tiny_cfg) -> VisionEncoder:
    weights = load_file(TINY / "tiny_main.safetensors")
    state = {_map_key(k): v for k, v in weights.items() if _map_key(k) is not None}
    model = VisionEncoder(tiny_cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(TINY / "golden_outputs.safetensors")


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    tiles = [preprocess_image(decode_image((TINY / n).read_bytes()), max_num=1) for n in IMAGE_FILES]
    return torch.cat(tiles)


def test_tower_last_hidden_state(encoder, pixel_values, golden):
    with torch.no_grad():
        h = encoder.vision_tower(pixel_values)
    assert h.shape == (3, 1025, 64)
    assert _rel_err(h[0], golden["vision_last_hidden_state_tile0"]) <= 1e-4


def test_pixel_shuffle_of_golden_hidden_state_is_exact(golden):
    h = golden["vision_last_hidden_state_tile0"][None]
    out = pixel_shuffle_features(h)
    assert out.shape == (1, 256, 256)
    assert torch.equal(out[0], golden["vision_tower_out_pixelshuffled"][0])


def test_pixel_shuffle_index_mapping():
    c = 3
    g = torch.arange(32 * 32 * c, dtype=torch.float64).reshape(1, 32, 32, c)
    h = torch.cat([torch.full((1, 1, c), -1.0, dtype=torch.float64), g.reshape(1, 1024, c)], dim=1)
    out = pixel_shuffle_features(h)
    for i, j, dr, dc in [(0, 0, 0, 1), (3, 7, 1, 0), (15, 15, 1, 1), (5, 2, 0, 0)]:
        expected = 0.5 * g[0, 2 * i + dr, 2 * j + dc]
        assert torch.equal(out[0, 16 * i + j, c * (2 * dr + dc) : c * (2 * dr + dc + 1)], expected)


def test_pixel_shuffle_rejects_odd_grid():
    with pytest.raises(InvalidInput):
        pixel_shuffle_features(torch.zeros(1, 1 + 15 * 15, 4))


def test_encoder_outputs(encoder, pixel_values, golden):
    with torch.no_grad():
        shuffled = pixel_shuffle_features(encoder.vision_tower(pixel_values))
        out = encoder(pixel_values)
    assert _rel_err(shuffled, golden["vision_tower_out_pixelshuffled"]) <= 1e-4
    assert out.shape == (3, 256, 64) and out.dtype == torch.float32
    assert _rel_err(out, golden["projector_out"]) <= 1e-4


def test_encoder_casts_input_to_module_dtype(encoder, pixel_values, golden):
    model = VisionEncoder(encoder.cfg)
    model.load_state_dict(encoder.state_dict())
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        out = model(pixel_values)  # float32 input into a float64 module
    assert out.dtype == torch.float64
    assert _rel_err(out, golden["projector_out"]) <= 1e-4


def test_position_embedding_interpolation(encoder, tiny_cfg):
    emb = encoder.vision_tower.embeddings
    # The native 32x32 grid uses the table as is.
    assert torch.equal(emb._patch_positions(32, 32), emb.position_embedding[:, 1:])
    # Other grids give 1 + gh*gw tokens.
    with torch.no_grad():
        h = encoder.vision_tower(torch.zeros(2, 3, 16 * 14, 24 * 14))
    assert h.shape == (2, 1 + 16 * 24, tiny_cfg.hidden_size)


def test_position_embedding_interpolation_layout(tiny_cfg):
    tower = InternVisionModel(tiny_cfg)
    emb = tower.embeddings
    c = tiny_cfg.hidden_size
    rows = torch.arange(32, dtype=torch.float32).repeat_interleave(32)  # value = patch row
    with torch.no_grad():
        emb.position_embedding[0, 1:] = rows[:, None].expand(1024, c)
        emb.position_embedding[0, :1] = 7.0
    pos = emb._patch_positions(20, 48).reshape(20, 48, c)  # row-major (row, col)
    # A table that varies only along rows still does after resizing, in every channel, and increases
    # from the top row to the bottom row.
    assert torch.allclose(pos, pos[:, :1, :1].expand(20, 48, c), atol=1e-5)
    assert bool((pos[1:, 0, 0] > pos[:-1, 0, 0]).all())
    # A constant table stays constant (bicubic weights sum to one).
    with torch.no_grad():
        emb.position_embedding.fill_(2.5)
    assert torch.allclose(emb._patch_positions(13, 40), torch.full((1, 13 * 40, c), 2.5), atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 448, 448),
        torch.zeros(1, 4, 448, 448),
        torch.zeros(1, 3, 10, 448),
        torch.zeros(0, 3, 448, 448),
    ],
    ids=["3d", "4-channels", "too-small", "empty-batch"],
)
def test_encoder_rejects_bad_pixel_values(encoder, bad):
    with pytest.raises(InvalidInput):
        encoder(bad)


def test_encoder_rejects_integer_pixels(encoder):
    with pytest.raises(InvalidInput):
        encoder(torch.zeros(1, 3, 448, 448, dtype=torch.uint8))


def test_real_size_names_and_shapes_match_manifest():
    manifest = json.loads((GOLDEN_DIR / "vita15_manifest.json").read_text())["main_model"]
    expected = {}
    for group in ("vision_tower", "mm_projector"):
        for entry in manifest["groups"][group]:
            key = _map_key(entry["name"])
            assert key is not None, entry["name"]
            expected[key] = tuple(entry["shape"])
    cfg = VisionConfig.from_reference(manifest["vision_config"], manifest["config"]["hidden_size"])
    assert cfg == VisionConfig()
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len(got) == 4 + 24 * 14 + 4  # embeddings, 14 tensors per layer, projector


def test_tower_state_dict_keys_without_prefix(tiny_cfg):
    with torch.device("meta"):
        tower = InternVisionModel(tiny_cfg)
    weights = load_file(TINY / "tiny_main.safetensors")
    prefix = "model.vision_tower.vision_tower."
    assert set(tower.state_dict()) == {k[len(prefix) :] for k in weights if k.startswith(prefix)}
