"""The checkpoint loader and the tiny checkpoint writer: the released layout, strictness (a missing,
unexpected or mis-shaped tensor names its file and key), dtypes, and the real-size names and shapes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitaserve.errors import CheckpointError
from vitaserve.models.checkpoint import CheckpointDir, main_tensor_shapes
from vitaserve.models.configs import AudioEncoderConfig, VisionConfig, VitaConfig

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).parents[1] / "golden" / "vita15_manifest.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written by the documented CLI, with fresh random weights."""
    out = tmp_path_factory.mktemp("random") / "ckpt"
    subprocess.run([sys.executable, "-m", "vitaserve.models.tiny", "--out", str(out), "--seed", "3"],
                   check=True, timeout=300)
    return out


@pytest.fixture
def broken(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the golden tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_released_layout(random_checkpoint: Path) -> None:
    names = {p.relative_to(random_checkpoint).as_posix() for p in random_checkpoint.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors.index.json", SHARD1, SHARD2, "tokenizer.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "vita_tts_ckpt/decoder/model.json",
            "vita_tts_ckpt/decoder/final.pt", "vita_tts_ckpt/codec/model.json",
            "vita_tts_ckpt/codec/final.pt"} <= names
    codec = torch.load(random_checkpoint / "vita_tts_ckpt/codec/final.pt", weights_only=True)
    assert set(codec) == {"generator", "quantizer"}
    assert any(k.endswith("weight_g") for k in codec["generator"])  # weight-norm form, as released


def test_random_checkpoint_loads_every_component(random_checkpoint: Path) -> None:
    ckpt = CheckpointDir(random_checkpoint)
    ckpt.verify()
    vision = ckpt.load_vision()
    assert vision(torch.zeros(1, 3, 448, 448)).shape == (1, 256, 64)
    audio = ckpt.load_audio()
    emb, n = audio(torch.randn(1, 100, 80), torch.tensor([100]))
    assert emb.shape == (1, 12, 64) and int(n[0]) == 12
    llm = ckpt.load_llm()
    tok = ckpt.tokenizer()
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and max(ids) < 1024
    out = list(llm.generate_stream(llm.splice_embeddings(ids), max_new_tokens=4))
    assert len(out) <= 4
    decoder = ckpt.load_speech_decoder()
    table = ckpt.load_embedding_table()
    codes = list(decoder.generate(decoder.text_to_hidden(table[torch.tensor(ids)]), max_tokens=10, greedy=True))
    assert all(0 <= c < 1024 for c in codes)
    wave = ckpt.load_codec().decode(torch.tensor([[1, 2, 3]]))
    assert wave.shape == (1, 1800) and torch.isfinite(wave).all()


def test_random_weights_depend_on_seed(random_checkpoint: Path, tmp_path: Path) -> None:
    from vitaserve.models.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=4)
    a = load_file(str(random_checkpoint / SHARD1))["model.layers.0.self_attn.q_proj.weight"]
    b = load_file(str(other / SHARD1))["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(a, b)
    assert abs(a.std().item() - 0.1) < 0.02  # N(0, initializer_range) like HF post_init


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    ckpt = CheckpointDir(tiny_checkpoint)
    ref = ckpt.load_vision()(torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0)))
    vision = ckpt.load_vision(dtype=dtype)
    assert vision.mm_projector[0].weight.dtype == dtype
    got = vision(torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0)))
    assert got.dtype == dtype
    assert (got.float() - ref).abs().max() / ref.abs().max() < 0.05
    llm = ckpt.load_llm(dtype="bf16" if dtype == torch.bfloat16 else "fp16")
    assert llm.lm_head.weight.dtype == dtype
    assert llm.model.rotary_emb.inv_freq.dtype == torch.float32  # rope table stays exact
    assert ckpt.load_speech_decoder(dtype=dtype).out_fnn.weight.dtype == dtype
    assert ckpt.load_codec(dtype=dtype).decode(torch.tensor([[5, 6]])).dtype == dtype


def test_unknown_dtype(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown dtype 'int3'"):
        CheckpointDir(tiny_checkpoint).load_vision(dtype="int3")


def test_real_size_main_checkpoint_names_and_shapes() -> None:
    """The whole main checkpoint (1159 tensors, 8.3B elements) from modules built on the meta device."""
    manifest = json.loads(MANIFEST.read_text())["main_model"]
    from vitaserve.models.checkpoint import _qwen2_config

    llm = _qwen2_config(manifest["config"])
    config = VitaConfig(
        llm=llm,
        vision=VisionConfig.from_reference(manifest["vision_config"], llm.hidden_size),
        audio=AudioEncoderConfig.from_reference(manifest["audio_encoder_config"]),
    )
    ours = main_tensor_shapes(config)
    expected = {t["name"]: tuple(t["shape"]) for group in manifest["groups"].values() for t in group}
    assert len(expected) == manifest["num_tensors"] == 1159
    assert ours == expected
    total = sum(torch.Size(s).numel() for s in ours.values())
    assert total == manifest["num_elements"]
    # The defaults of a config.json without vision/audio sections are the real sizes too.
    assert VisionConfig(llm_hidden_size=3584) == config.vision
    assert AudioEncoderConfig(llm_hidden_size=3584) == config.audio


# ------------------------------------------------------------------------------------------- strictness
def _rewrite_shard(path: Path, edit) -> None:  # noqa: ANN001
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite_index(root: Path, edit) -> None:  # noqa: ANN001
    index = json.loads((root / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor_names_file_and_key(broken: Path) -> None:
    key = "model.mm_projector.2.bias"
    _rewrite_shard(broken / SHARD2, lambda t: t.pop(key))
    _rewrite_index(broken, lambda m: m.pop(key))
    ckpt = CheckpointDir(broken)
    with pytest.raises(CheckpointError, match=r"missing tensor 'mm_projector\.2\.bias'") as err:
        ckpt.load_vision()
    assert SHARD2 in str(err.value)
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        ckpt.verify()


def test_unexpected_tensor(broken: Path) -> None:
    key = "model.mm_projector.4.weight"
    _rewrite_shard(broken / SHARD2, lambda t: t.__setitem__(key, torch.zeros(2, 2)))
    _rewrite_index(broken, lambda m: m.__setitem__(key, SHARD2))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'mm_projector\.4\.weight'"):
        CheckpointDir(broken).load_vision()


def test_misshaped_tensor(broken: Path) -> None:
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_shard(broken / SHARD1, lambda t: t.__setitem__(key, torch.zeros(100, 64)))
    ckpt = CheckpointDir(broken)
    with pytest.raises(CheckpointError, match=rf"{SHARD1}.*'{key}' has shape \[100, 64\], expected \[128, 64\]"):
        ckpt.verify()
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \[100, 64\]"):
        ckpt.load_llm()


def test_truncated_safetensors(broken: Path) -> None:
    data = (broken / SHARD1).read_bytes()
    (broken / SHARD1).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{SHARD1}.*(unreadable|truncated)"):
        CheckpointDir(broken).load_llm()


def test_truncated_header(broken: Path) -> None:
    (broken / SHARD2).write_bytes((broken / SHARD2).read_bytes()[:20])
    with pytest.raises(CheckpointError, match=f"{SHARD2}: unreadable safetensors"):
        CheckpointDir(broken)


def test_index_and_shards_disagree(broken: Path) -> None:
    _rewrite_index(broken, lambda m: m.__setitem__("model.norm.weight", SHARD2))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        CheckpointDir(broken)


def test_missing_shard(broken: Path) -> None:
    (broken / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=f"{SHARD2}: shard file not found"):
        CheckpointDir(broken)


@pytest.mark.parametrize("model_type", ["llama", None])
def test_unknown_checkpoint_type(broken: Path, model_type: str | None) -> None:
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = model_type
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        CheckpointDir(broken)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        CheckpointDir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointDir(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        CheckpointDir(tmp_path / "nope")


def test_speech_decoder_forms(broken: Path) -> None:
    """final.pt nested under 'model' loads; a corrupt final.pt and a missing model.json are clear errors."""
    path = broken / "vita_tts_ckpt/decoder/final.pt"
    torch.save({"model": torch.load(path, weights_only=True)}, path)
    assert CheckpointDir(broken).load_speech_decoder().out_fnn.bias.shape == (1028,)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="final.pt: unreadable torch checkpoint"):
        CheckpointDir(broken).load_speech_decoder()
    (broken / "vita_tts_ckpt/decoder/model.json").unlink()
    with pytest.raises(CheckpointError, match="decoder/model.json: file not found"):
        CheckpointDir(broken).load_speech_decoder()


def test_codec_folded_safetensors_form(broken: Path, golden_dir: Path) -> None:
    """A codec exported with the weight norm folded (as `remove_weight_norm` leaves it) gives the same wave."""
    ckpt = CheckpointDir(broken)
    reference = ckpt.load_codec()
    codes = torch.tensor([[1, 500, 1000, 7]])
    folded = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert not any(k.endswith("weight_g") for k in folded)
    (broken / "vita_tts_ckpt/codec/final.pt").unlink()
    save_file(folded, str(broken / "vita_tts_ckpt/codec/model.safetensors"))
    again = CheckpointDir(broken).load_codec()
    assert torch.allclose(again.decode(codes), reference.decode(codes), atol=1e-6)
    # and a shape mismatch there is named
    folded["quantizer.quantizer_modules.0.embedding.weight"] = torch.zeros(10, 512)
    save_file(folded, str(broken / "vita_tts_ckpt/codec/model.safetensors"))
    with pytest.raises(CheckpointError, match="quantizer_modules.0.embedding.weight"):
        CheckpointDir(broken).load_codec()
