"""The conformance runner on the golden tiny folder: every reference tensor within 1e-4 relative, ids exact,
tile hashes equal. Also checks the runner on a folder made by the same recipe with other inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.unit

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def conformance_run(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the documented CLI once, as a user would."""
    out = tmp_path_factory.mktemp("conformance") / "outputs.safetensors"
    subprocess.run(
        [sys.executable, "-m", "vitaserve.models.golden", "--golden", str(golden_dir), "--out", str(out)],
        check=True,
        timeout=300,
    )
    return out


def _reference(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / "golden_outputs.safetensors"))


def test_every_reference_tensor_is_produced(conformance_run: Path, golden_dir: Path) -> None:
    ours = load_file(str(conformance_run))
    assert set(_reference(golden_dir)) <= set(ours)


@pytest.mark.parametrize(
    "name",
    sorted(load_file(str(Path(__file__).parents[1] / "golden/vita15-tiny/golden_outputs.safetensors"))),
)
def test_tensor_matches_reference(conformance_run: Path, golden_dir: Path, name: str) -> None:
    ref = _reference(golden_dir)[name]
    ours = load_file(str(conformance_run))[name]
    assert tuple(ours.shape) == tuple(ref.shape), name
    if ref.dtype == torch.int64:
        assert torch.equal(ours, ref), f"{name}: ids differ\nours={ours}\nref={ref}"
    else:
        scale = ref.abs().max().item()
        err = (ours.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)
        assert err <= REL_TOL, f"{name}: relative error {err:.3e} > {REL_TOL}"


def test_tile_hashes_match(conformance_run: Path, golden_dir: Path) -> None:
    with safe_open(str(conformance_run), framework="pt") as f:
        hashes = json.loads(f.metadata()["tiles_sha256"])
    meta = json.loads((golden_dir / "tiles_meta.json").read_text())
    for key, entry in meta.items():
        assert len(hashes[key]) == entry["num_tiles"], key
        assert hashes[key] == entry["tile_sha256_uint8_HWC"], key


def test_runner_works_on_another_folder_of_the_same_recipe(golden_dir: Path, tmp_path: Path) -> None:
    """Other inputs: two images of other sizes, a shorter WAV, other ids. The runner must derive every count
    (tiles, placeholders, audio tokens, generation lengths) from the folder, not from constants."""
    folder = tmp_path / "variant"
    folder.mkdir()
    for name in ("tiny_main.safetensors", "tiny_tts_decoder.safetensors", "tiny_codec.safetensors",
                 "tiny_configs.json", "global_cmvn.json"):
        shutil.copy(golden_dir / name, folder / name)
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate([(640, 480), (500, 1500)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"image{i}_{w}x{h}.png")
    t = np.arange(16000) / 16000
    sf.write(folder / "audio_16k_1s.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000,
             subtype="PCM_16")
    ids = torch.tensor([[5, 6, 7, -200, 8, 9, -500, 10, 11]])
    save_file({"llm_input_ids": ids, "tts_text_ids": torch.tensor([[3, 4, 5]]),
               "codec_codes": torch.tensor([[1, 2, 3, 4, 5]]), "llm_generated_ids": torch.zeros(5, dtype=torch.int64),
               "tts_ar_tokens_argmax": torch.zeros(7, dtype=torch.int64)},
              str(folder / "golden_outputs.safetensors"))

    from vitaserve.models.golden import run

    out = run(folder, tmp_path / "out.safetensors")
    assert out["pixel_values_image0_max12_sum_per_tile_channel"].shape == (13, 3)  # 4x3 grid + thumbnail
    assert out["pixel_values_image1_max12_sum_per_tile_channel"].shape == (4, 3)  # 1x3 (2x6 loses the area tie) + thumbnail
    assert out["projector_out"].shape == (2, 256, 64)
    n_audio = int(out["audio_num_llm_tokens"][0])
    assert n_audio == 12  # 98 fbank frames -> 12 LLM tokens
    assert out["llm_inputs_embeds"].shape == (7 + 256 + n_audio, 64)
    assert out["llm_generated_ids"].shape == (5,)
    assert out["tts_hidden_in"].shape == (6, 32)
    assert out["tts_ar_tokens_argmax"].numel() <= 7
    assert out["codec_wave"].shape == (3000,)
