"""The output folder of a job: `results.jsonl` and `audio/<id>.wav`, always written atomically.

    <out_dir>/results.jsonl     one line per finished item, in manifest order
    <out_dir>/audio/<id>.wav    24 kHz mono PCM_16, for items that asked for audio and got a reply
    <out_dir>/manifest.jsonl    the generated manifest of a folder job

Why results.jsonl is rewritten rather than appended: the results live in Redis, one record per item written
exactly once (`store.JobStore.record`), so the file is a pure function of that hash. Each rewrite goes to a
temporary file in the same folder, is fsynced and renamed over the old one (`os.replace` is atomic on POSIX),
under a per-job Redis lock so a rewrite never replaces a newer file with an older one. A reader therefore
sees a complete file with no duplicate and no half line at any moment, and a crash at any point leaves the
previous complete file. An append log would need a dedupe pass and repair of torn last lines.

WAVs: an attempt writes `audio/.<id>.<token>.wav.tmp`, records its result naming that temporary file, and
only then renames it to `audio/<id>.wav`; `commit_audio` repeats the rename when a crash fell between the two
steps, so exactly the audio of the recorded result ends up under the final name. Temporaries of attempts whose
result was not recorded are deleted when the job finishes.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from vitaserve.models.codec import pcm_to_int16

RESULTS_FILE = "results.jsonl"
AUDIO_DIR = "audio"
# Fields of a result that are internal bookkeeping, not part of results.jsonl.
_PRIVATE = ("audio_tmp",)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def render_results(order: Iterable[str], results: Mapping[str, Mapping[str, Any]]) -> bytes:
    """One JSON line per item of `order` that has a result, in that order (public fields only)."""
    lines = []
    for item_id in order:
        result = results.get(item_id)
        if result is None:
            continue
        public = {k: v for k, v in result.items() if k not in _PRIVATE}
        lines.append(json.dumps(public, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def write_results(out_dir: Path, order: Iterable[str], results: Mapping[str, Mapping[str, Any]]) -> Path:
    path = out_dir / RESULTS_FILE
    atomic_write_bytes(path, render_results(order, results))
    return path


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def audio_name(item_id: str) -> str:
    """The final WAV of an item, relative to the output folder."""
    return f"{AUDIO_DIR}/{item_id}.wav"


def write_audio_tmp(out_dir: Path, item_id: str, token: str, pcm: np.ndarray, sample_rate: int) -> str:
    """Write an attempt's WAV under a temporary name (fsynced); returns that name relative to out_dir."""
    rel = f"{AUDIO_DIR}/.{item_id}.{_safe(token)}.wav.tmp"
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        soundfile.write(f, pcm_to_int16(pcm), sample_rate, subtype="PCM_16", format="WAV")
        f.flush()
        os.fsync(f.fileno())
    return rel


def commit_audio(out_dir: Path, result: Mapping[str, Any]) -> bool:
    """Move a recorded result's temporary WAV to its final name (idempotent). False if the result names
    audio that exists under neither name."""
    final, tmp = result.get("audio"), result.get("audio_tmp")
    if not final:
        return True
    final_path = out_dir / final
    if tmp and (out_dir / tmp).exists():
        os.replace(out_dir / tmp, final_path)
        _fsync_dir(final_path.parent)
    return final_path.exists()


def discard(out_dir: Path, rel: str | None) -> None:
    if rel:
        (out_dir / rel).unlink(missing_ok=True)


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporaries left by attempts that died or lost their claim (call once the job is over)."""
    removed = 0
    for folder in (out_dir, out_dir / AUDIO_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _safe(token: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in token)[:80]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
