"""Unit tests of the wire contract (`components.tensors`) and the repository renderer: the checked-in
model repository equals the rendered default, configs parse as Triton's protobuf and pass the specs'
own check, and the GPU variant differs only where it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from vitaserve.components.tensors import (
    LLM_DECODER,
    MODELS,
    VISION_ENCODER,
    format_error,
    pack_media,
    parse_error,
    unpack_media,
)
from vitaserve.errors import InvalidInput, ResourceExhausted, Unavailable, VitaserveError
from vitaserve.triton.repository import (
    CHECKED_IN,
    LLM_ENGINE_CHOICE,
    LLM_ENGINE_DEFAULTS,
    LLM_STREAM_DEFAULTS,
    SPEECH_ENGINE_DEFAULTS,
    render_config,
    render_repository,
)

pytestmark = pytest.mark.unit


def parsed(config_text: str) -> dict[str, Any]:
    """A config.pbtxt as the JSON dict Triton hands to `initialize` (snake_case keys)."""
    message = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# ---- the checked-in repository ---------------------------------------------------------------------


def test_checked_in_repository_equals_the_rendered_default(tmp_path: Path) -> None:
    render_repository(tmp_path)
    assert sorted(p.name for p in CHECKED_IN.iterdir() if p.is_dir()) == sorted(MODELS)
    for name in MODELS:
        for rel in ("config.pbtxt", "1/model.py"):
            assert (CHECKED_IN / name / rel).read_text() == (tmp_path / name / rel).read_text(), (
                f"{name}/{rel} drifted from the specs: run `python -m vitaserve.triton.repository "
                f"--out services/triton/model_repository`")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rendered_configs_parse_and_match_their_spec(name: str) -> None:
    config = parsed((CHECKED_IN / name / "config.pbtxt").read_text())
    MODELS[name].check_config(config)
    assert config["name"] == name and config["backend"] == "python"
    params = {k: v["string_value"] if v else "" for k, v in config["parameters"].items()}
    assert params.get("checkpoint_dir", "") == "" and params["dtype"] == "float32" and params["device"] == "cpu"
    assert params.get("family", "") == ""  # the server's VITASERVE_MODEL_FAMILY decides
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    if MODELS[name].batched:
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    else:
        assert config["model_transaction_policy"]["decoupled"] is True


def test_gpu_rendering(tmp_path: Path) -> None:
    out = render_repository(tmp_path, kind="gpu", instances=2, family="vita15", checkpoint_dir="/models/VITA-1.5",
                            dtype="bfloat16", models=["llm_decoder", "vision_encoder"], max_streams=8)
    assert sorted(p.name for p in out.iterdir()) == ["llm_decoder", "vision_encoder"]
    llm = parsed((out / "llm_decoder" / "config.pbtxt").read_text())
    LLM_DECODER.check_config(llm)
    assert llm["instance_group"] == [{"kind": "KIND_GPU", "count": 2}]
    params = {k: v["string_value"] for k, v in llm["parameters"].items()}
    assert params == {"family": "vita15", "checkpoint_dir": "/models/VITA-1.5", "dtype": "bfloat16", "device": "cuda",
                      **LLM_ENGINE_DEFAULTS, **LLM_ENGINE_CHOICE, **LLM_STREAM_DEFAULTS}  # one engine thread
    assert (out / "llm_decoder" / "1" / "model.py").read_text() == (
        CHECKED_IN / "llm_decoder" / "1" / "model.py").read_text()
    with pytest.raises(ValueError, match="unknown model family 'vita2'; known: vita15, small"):
        render_repository(tmp_path, family="vita2")


def test_the_vllm_parameters_defaults_are_vllm_options_defaults(tmp_path: Path) -> None:
    from vitaserve.components.vllm_engine import VllmOptions

    params = {k: v for k, v in LLM_ENGINE_CHOICE.items() if k.startswith("vllm_")}
    assert VllmOptions.from_parameters(params) == VllmOptions()
    assert VllmOptions.from_parameters({}) == VllmOptions()
    chosen = VllmOptions.from_parameters({"vllm_kv_cache_bytes": "1048576", "vllm_enforce_eager": "true",
                                          "vllm_tensor_parallel_size": "2"})
    assert (chosen.kv_cache_bytes, chosen.enforce_eager, chosen.tensor_parallel_size) == (1048576, True, 2)
    args = chosen.engine_args(tmp_path)
    assert args["enable_prompt_embeds"] and args["enable_prefix_caching"]
    assert args["kv_cache_memory_bytes"] == 1048576 and args["tensor_parallel_size"] == 2
    for bad in ({"vllm_enforce_eager": "maybe"}, {"vllm_max_num_seqs": "0"}, {"vllm_gpu_memory_utilization": "1.5"},
                {"vllm_kv_cache_bytes": "lots"}):
        with pytest.raises(ValueError, match="vllm_"):
            VllmOptions.from_parameters(bad)
    out = render_repository(tmp_path / "repo", models=["llm_decoder"], llm_engine={"engine": "vllm"})
    assert 'key: "engine" value: { string_value: "vllm" }' in (out / "llm_decoder" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="engine must be one of"):
        render_repository(tmp_path / "bad", models=["llm_decoder"], llm_engine={"engine": "tgi"})


def test_llm_engine_parameters_render_and_parse(tmp_path: Path) -> None:
    from vitaserve.batching import EngineConfig

    defaults = EngineConfig.from_parameters(LLM_ENGINE_DEFAULTS)
    assert defaults == EngineConfig(), "LLM_ENGINE_DEFAULTS differ from EngineConfig's defaults"
    out = render_repository(tmp_path, models=["llm_decoder", "speech_synth"], max_streams=8,
                            llm_engine={"max_batch": "64", "kv_cache_bytes": "1048576"})
    llm = {k: v["string_value"] if v else "" for k, v in parsed((out / "llm_decoder" / "config.pbtxt").read_text())
           ["parameters"].items()}
    assert EngineConfig.from_parameters(llm) == EngineConfig(max_batch=64, kv_cache_bytes=1048576)
    speech = parsed((out / "speech_synth" / "config.pbtxt").read_text())["parameters"]
    assert speech["max_streams"]["string_value"] == "8"
    with pytest.raises(ValueError, match="unknown llm_decoder engine parameter"):
        render_repository(tmp_path, models=["llm_decoder"], llm_engine={"max_batchh": "3"})
    with pytest.raises(ValueError, match="max_batch must be an integer"):
        EngineConfig.from_parameters({"max_batch": "lots"})
    with pytest.raises(ValueError, match="prefix_cache must be true or false"):
        EngineConfig.from_parameters({"prefix_cache": "maybe"})


def test_speech_engine_parameters_render_and_parse(tmp_path: Path) -> None:
    import inspect

    from vitaserve.batching import SpeechBatchConfig
    from vitaserve.components.engines import SpeechEngine

    batch_keys = {k: v for k, v in SPEECH_ENGINE_DEFAULTS.items() if k != "codec_workers"}
    assert SpeechBatchConfig.from_parameters(batch_keys) == SpeechBatchConfig(), \
        "SPEECH_ENGINE_DEFAULTS differ from SpeechBatchConfig's defaults"
    codec_default = inspect.signature(SpeechEngine).parameters["codec_workers"].default
    assert SPEECH_ENGINE_DEFAULTS["codec_workers"] == str(codec_default)
    out = render_repository(tmp_path, models=["speech_synth"], max_streams=16,
                            speech_engine={"max_queue": "8", "codec_workers": "2"})
    params = {k: v["string_value"] if v else "" for k, v in parsed((out / "speech_synth" / "config.pbtxt").read_text())
              ["parameters"].items()}
    assert params["max_streams"] == "16" and params["codec_workers"] == "2"
    assert SpeechBatchConfig.from_parameters(params) == SpeechBatchConfig(max_queue=8)
    with pytest.raises(ValueError, match="unknown speech_synth engine parameter"):
        render_repository(tmp_path, models=["speech_synth"], speech_engine={"max_batch": "3"})


def test_render_rejects_bad_options(tmp_path: Path) -> None:
    for kwargs, match in [({"kind": "tpu"}, "kind"), ({"dtype": "int8"}, "dtype"), ({"instances": 0}, ">= 1"),
                          ({"models": ["nope"]}, "unknown")]:
        with pytest.raises(ValueError, match=match):
            render_repository(tmp_path, **kwargs)
    with pytest.raises(FileNotFoundError, match="model adapter"):
        render_repository(tmp_path / "out", source=tmp_path / "empty")


def test_render_escapes_the_checkpoint_path() -> None:
    config = parsed(render_config(VISION_ENCODER, checkpoint_dir='/odd "dir"\\x'))
    assert config["parameters"]["checkpoint_dir"]["string_value"] == '/odd "dir"\\x'


def test_cli(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vitaserve.triton.repository", "--out", str(tmp_path),
                           "--kind", "gpu", "--models", "speech_synth"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "KIND_GPU" in (tmp_path / "speech_synth" / "config.pbtxt").read_text()
    bad = subprocess.run([sys.executable, "-m", "vitaserve.triton.repository", "--out", str(tmp_path),
                          "--models", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown" in bad.stderr


# ---- spec checks -----------------------------------------------------------------------------------


def test_check_config_names_every_difference() -> None:
    config = parsed(render_config(LLM_DECODER))
    config["model_transaction_policy"] = {"decoupled": False}
    config["input"] = [i for i in config["input"] if i["name"] != "SEED"]
    config["input"][0]["data_type"] = "TYPE_FP32"
    config["output"].append({"name": "EXTRA", "data_type": "TYPE_FP32", "dims": ["1"]})
    with pytest.raises(RuntimeError) as caught:
        LLM_DECODER.check_config(config)
    message = str(caught.value)
    for part in ("decoupled is False, expected True", "input SEED is missing",
                 "input PROMPT is TYPE_FP32, expected TYPE_STRING", "unexpected output EXTRA"):
        assert part in message


def test_check_config_batching_and_dims() -> None:
    config = parsed(render_config(VISION_ENCODER))
    config["max_batch_size"] = 0
    config["output"][0]["dims"] = ["-1"]
    with pytest.raises(RuntimeError, match=r"max_batch_size is 0.*EMBEDDINGS has dims \[-1\], expected \[-1, -1\]"):
        VISION_ENCODER.check_config(config)


# ---- media packing and errors ----------------------------------------------------------------------


def test_media_round_trip() -> None:
    media = [np.ones((256, 8), np.float32), np.zeros((3, 8), np.float64), np.full((5, 8), 2, np.float32)]
    packed = pack_media(media)
    assert packed["MEDIA_EMBEDS"].shape == (264, 8) and packed["MEDIA_EMBEDS"].dtype == np.float32
    assert packed["MEDIA_ROWS"].tolist() == [256, 3, 5]
    for a, b in zip(unpack_media(packed["MEDIA_EMBEDS"], packed["MEDIA_ROWS"]), media):
        np.testing.assert_array_equal(a, b)
    assert pack_media([]) == {} and unpack_media(None, None) == []


def test_media_errors() -> None:
    with pytest.raises(InvalidInput, match="one width"):
        pack_media([np.zeros((2, 8), np.float32), np.zeros((2, 4), np.float32)])
    with pytest.raises(InvalidInput, match="2-D float"):
        pack_media([np.zeros(8, np.float32)])
    with pytest.raises(InvalidInput, match="together"):
        unpack_media(np.zeros((2, 8), np.float32), None)
    with pytest.raises(InvalidInput, match="do not split"):
        unpack_media(np.zeros((2, 8), np.float32), np.array([1, 2], np.int32))


def test_error_round_trip() -> None:
    for exc in (InvalidInput("bad image"), Unavailable("busy"), ResourceExhausted("queue\nfull")):
        back = parse_error(format_error(exc))
        assert type(back) is type(exc) and back.message == exc.message and back.code == exc.code
    internal = parse_error(format_error(VitaserveError("boom")))
    assert type(internal) is VitaserveError and internal.code == "INTERNAL"
    assert parse_error("Request for unknown model") is None


def test_cancel_poll_asks_the_server_at_most_once_per_interval() -> None:
    from vitaserve.triton.backend import CancelPoll

    class Sender:
        asks = 0
        cancelled = False

        def is_cancelled(self) -> bool:
            self.asks += 1
            return self.cancelled

    sender = Sender()
    poll = CancelPoll(sender, interval_s=3600)
    assert [poll() for _ in range(1000)] == [False] * 1000
    assert sender.asks == 1  # one IPC round trip, not a thousand
    eager = CancelPoll(sender, interval_s=0)
    sender.cancelled = True
    assert eager() is True
    sender.cancelled = False
    assert eager() is True  # a cancellation is remembered
