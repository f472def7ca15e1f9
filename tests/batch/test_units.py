"""Unit tests of the batch service's pure logic: manifest parsing, the results writer and the WAV commit
protocol, schedules files, settings, the progress line. The Redis scripts behind exactly-once are tested
against the session's real Redis (`test_store_*`)."""

from __future__ import annotations

import json
import os
from datetime import datetime, UTC
from pathlib import Path

import numpy as np
import pytest
import soundfile

from vitaserve_batch import results as out
from vitaserve_batch.cli import main as cli_main
from vitaserve_batch.cli import progress_line
from vitaserve_batch.harness import free_port
from vitaserve_batch.manifest import Item, LineError, folder_manifest, parse_manifest
from vitaserve_batch.schedules import ScheduleError, beat_schedule, load_schedules, next_run
from vitaserve_batch.settings import BatchSettings

pytestmark = [pytest.mark.unit]


def parse(lines: list[str], base: Path = Path("/data")) -> list:
    return parse_manifest(lines, base_dir=base, max_tokens_limit=100)


# ---- manifest -----------------------------------------------------------------------------------------


def test_good_lines_become_items_with_absolute_paths() -> None:
    entries = parse([
        json.dumps({"id": "a", "image": "img/a.png", "prompt": "What?"}),
        "",
        json.dumps({"id": "b.1_x-y", "images": ["/abs/b.png", "c.png"], "text": "Q", "want_audio": True,
                    "max_tokens": 7, "temperature": 0.5, "seed": 3, "max_tiles": 2, "system_prompt": "S"}),
        json.dumps({"id": "c", "audio": "q.wav"}),
        json.dumps({"id": "d", "video": "clips/d"}),
    ])
    assert [e.line for e in entries] == [1, 3, 4, 5]
    a, b, c, d = (e.parsed for e in entries)
    assert isinstance(a, Item) and a.images == ("/data/img/a.png",) and a.prompt == "What?"
    assert b.images == ("/abs/b.png", "/data/c.png") and b.prompt == "Q"
    assert b.options() == {"want_audio": True, "max_tokens": 7, "temperature": 0.5, "seed": 3, "max_tiles": 2,
                           "system_prompt": "S"}
    assert c.audio == "/data/q.wav" and c.options()["want_audio"] is None
    assert d.video == "/data/clips/d"


@pytest.mark.parametrize(("line", "item_id", "message"), [
    ('{"id": "x", ', "line-1", "bad JSON"),
    ("[1, 2]", "line-1", "expected a JSON object, got list"),
    ('"text"', "line-1", "expected a JSON object, got str"),
    ('{"prompt": "no id"}', "line-1", "missing field 'id'"),
    ('{"id": "x", "prompt": "p", "want_audoi": true}', "x", "unknown field 'want_audoi'"),
    ('{"id": "../etc/passwd", "prompt": "p"}', "line-1", "id: must be 1-128 characters"),
    ('{"id": "x"}', "x", "no query"),
    ('{"id": "x", "prompt": "p", "max_tokens": 0}', "x", "max_tokens"),
    ('{"id": "x", "prompt": "p", "max_tokens": 101}', "x", "above the limit 100"),
    ('{"id": "x", "prompt": "p", "max_tiles": 13}', "x", "max_tiles"),
    ('{"id": "x", "prompt": "p", "want_audio": "yes please"}', "x", "want_audio"),
    ('{"id": "x", "images": ["a.png"], "video": "v"}', "x", "images or video, not both"),
    ('{"id": "x", "prompt": "p", "text": "q"}', "x", "not both"),
    ('{"id": "x", "images": [1, 2]}', "x", "images"),
])
def test_bad_lines_become_errors_of_their_own_item(line: str, item_id: str, message: str) -> None:
    [entry] = parse([line])
    assert isinstance(entry.parsed, LineError)
    assert entry.id == item_id and entry.line == 1
    assert message in entry.parsed.message and entry.parsed.message.startswith("line 1: ")


def test_duplicate_ids_keep_the_first_and_the_job_goes_on() -> None:
    entries = parse([json.dumps({"id": "a", "prompt": "1"}), json.dumps({"id": "a", "prompt": "2"}),
                     json.dumps({"id": "b", "prompt": "3"})])
    assert isinstance(entries[0].parsed, Item) and entries[0].parsed.prompt == "1"
    assert isinstance(entries[1].parsed, LineError) and entries[1].id == "line-2"
    assert "duplicate id 'a'" in entries[1].parsed.message
    assert isinstance(entries[2].parsed, Item)


def test_manifest_item_limit() -> None:
    with pytest.raises(ValueError, match="more than 2 items"):
        parse_manifest([json.dumps({"id": f"i{k}", "prompt": "p"}) for k in range(3)], base_dir=Path("/"),
                       max_items=2)


def test_folder_manifest_lists_images_sorted_with_safe_ids(tmp_path: Path) -> None:
    for name in ("b.PNG", "a photo.jpg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    lines = folder_manifest(tmp_path, prompt="Describe.", options={"max_tokens": 5})
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ["hidden.png", "a_photo.jpg", "b.PNG"]
    assert all(r["prompt"] == "Describe." and r["max_tokens"] == 5 for r in rows)
    assert rows[1]["images"] == [str(tmp_path / "a photo.jpg")]
    assert all(isinstance(e.parsed, Item) for e in parse([json.dumps(r) for r in rows]))


# ---- results writer and WAV commit ---------------------------------------------------------------------


def test_results_are_written_in_manifest_order_without_private_fields(tmp_path: Path) -> None:
    results = {"b": {"id": "b", "status": "ok", "audio_tmp": "audio/.b.t.wav.tmp"},
               "a": {"id": "a", "status": "error", "error": "bad"}}
    out.write_results(tmp_path, ["a", "missing", "b"], results)
    assert out.read_results(tmp_path) == [{"id": "a", "status": "error", "error": "bad"},
                                          {"id": "b", "status": "ok"}]
    # A rewrite replaces the file whole, and leaves no temporary behind.
    out.write_results(tmp_path, ["b"], results)
    assert [r["id"] for r in out.read_results(tmp_path)] == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]
    out.write_results(tmp_path, [], {})
    assert (tmp_path / "results.jsonl").read_bytes() == b""


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    target = tmp_path / "results.jsonl"
    out.atomic_write_bytes(target, b'{"id":"old"}\n')

    def boom(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        out.atomic_write_bytes(target, b'{"id":"new"}\n')
    assert target.read_bytes() == b'{"id":"old"}\n'
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]


def test_wav_commit_protocol(tmp_path: Path) -> None:
    pcm = np.sin(np.linspace(0, 100, 2400)).astype(np.float32) * 0.5
    tmp = out.write_audio_tmp(tmp_path, "item-1", "host-1-abc", pcm, 24000)
    assert tmp.startswith("audio/.item-1.") and tmp.endswith(".wav.tmp")
    result = {"id": "item-1", "audio": out.audio_name("item-1"), "audio_tmp": tmp}
    assert out.commit_audio(tmp_path, result)
    assert out.commit_audio(tmp_path, result), "idempotent: a redelivered task repeats it harmlessly"
    data, rate = soundfile.read(tmp_path / "audio" / "item-1.wav", dtype="int16")
    assert rate == 24000 and data.shape == (2400,)
    # A losing attempt's temporary is removed when the job finishes; the committed WAV stays.
    out.write_audio_tmp(tmp_path, "item-1", "host-2-def", pcm, 24000)
    assert out.remove_stale_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path / "audio")) == ["item-1.wav"]
    assert not out.commit_audio(tmp_path, {"audio": "audio/gone.wav", "audio_tmp": None})
    assert out.commit_audio(tmp_path, {"audio": None})


# ---- the Redis scripts (real Redis) ---------------------------------------------------------------------


def test_store_records_once_and_fences_by_claim(store) -> None:  # noqa: ANN001
    job = f"unit-{os.getpid()}-{id(store)}"
    assert store.create_job(job, {"out_dir": "/tmp/x", "concurrency": 2})
    assert not store.create_job(job, {"out_dir": "/elsewhere"}), "a repeated submission keeps the job"
    assert store.job(job)["out_dir"] == "/tmp/x" and store.job(job)["status"] == "queued"
    assert store.claim(job, "a", "t1", 5.0)
    assert not store.claim(job, "a", "t2", 5.0)
    assert 4.0 < store.claim_ttl_s(job, "a") <= 5.0
    assert store.record(job, "a", {"status": "ok", "n": 2}, token="t2") == -1, "another attempt holds it"
    assert store.record(job, "a", {"status": "ok", "n": 1}, token="t1") == 1
    assert store.record(job, "a", {"status": "error"}, token="t1") == 0, "a result is written once"
    store.release(job, "a", "t2")
    assert store.claim_ttl_s(job, "a") > 0, "release by a stranger is ignored"
    store.release(job, "a", "t1")
    assert store.claim_ttl_s(job, "a") == 0
    assert store.record(job, "b", {"status": "cancelled"}) == 1
    assert store.result(job, "a") == {"status": "ok", "n": 1}
    assert store.counts(job) == {"ok": 1, "cancelled": 1} and store.done_count(job) == 2
    assert store.store_items(job, [{"id": "a"}, {"id": "b"}]) == 2
    assert store.store_items(job, [{"id": "z"}]) == 2, "items are stored once"
    assert store.item(job, 1) == {"id": "b"} and store.item(job, 5) is None
    assert not store.cancelled(job) and store.cancel(job) and store.cancelled(job)
    assert not store.cancel("no-such-job")


# ---- schedules -----------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "schedules.toml"
    path.write_text(text)
    return path


def test_schedules_file_gives_beat_entries(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[job]]
name = "nightly"
cron = "30 2 * * 1-5"
manifest = "/data/nightly.jsonl"
out = "/data/out"
[job.options]
want_audio = true

[[job]]
name = "inbox"
every_s = 10
folder = "/data/inbox"
prompt = "Describe."
out = "/data/captions"
concurrency = 1

[[job]]
name = "off"
every_s = 10
folder = "/x"
prompt = "p"
out = "/y"
enabled = false
""")
    entries = load_schedules(path)
    beat = beat_schedule(entries, queue="q")
    assert sorted(beat) == ["inbox", "nightly"]
    assert beat["nightly"]["task"] == "vitaserve_batch.scheduled_job"
    name, spec = beat["nightly"]["args"]
    assert name == "nightly" and spec["manifest"] == "/data/nightly.jsonl"
    assert spec["options"] == {"want_audio": True} and spec["source"] == "schedule:nightly"
    assert beat["inbox"]["schedule"].run_every.total_seconds() == 10
    assert beat["inbox"]["options"] == {"queue": "q"}
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)  # a Friday
    assert next_run(entries[0], now) == datetime(2026, 12, 7, 2, 30, tzinfo=UTC)  # Monday 02:30


@pytest.mark.parametrize(("body", "message"), [
    ('[[job]]\nname = "a"\ncron = "61 * * * *"\nfolder = "/f"\nprompt = "p"\nout = "/o"', "cron"),
    ('[[job]]\nname = "a"\ncron = "* * *"\nfolder = "/f"\nprompt = "p"\nout = "/o"', "5 fields"),
    ('[[job]]\nname = "a"\nfolder = "/f"\nprompt = "p"\nout = "/o"', "exactly one of cron or every_s"),
    ('[[job]]\nname = "a"\nevery_s = 5\nfolder = "/f"\nout = "/o"', "needs a prompt"),
    ('[[job]]\nname = "a"\nevery_s = 5\nmanifest = "/m"\nout = "/o"\nretries = 3', "retries"),
    ('[[job]]\nname = "a"\nevery_s = 5\nmanifest = "/m"\nout = "/o"\n[job.options]\nwant_audoi = true',
     "want_audoi"),
    (('[[job]]\nname = "a"\nevery_s = 5\nmanifest = "/m"\nout = "/o"\n'
     '[[job]]\nname = "a"\nevery_s = 5\nmanifest = "/m"\nout = "/o"'), "duplicate job name"),
    ('[jobs]\nx = 1', "unknown top-level key"),
    ("name = ", "bad TOML"),
])
def test_bad_schedules_files_fail_with_a_message(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message) as err:
        load_schedules(write(tmp_path, body))
    assert str(tmp_path) in str(err.value)


# ---- settings and progress -----------------------------------------------------------------------------


def test_settings_read_batch_and_shared_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("VITASERVE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VITASERVE_TRITON_URL", "shared:8001")
    monkeypatch.setenv("VITASERVE_BATCH_LLM_DECODER_URL", "batch-llm:8001")
    monkeypatch.setenv("VITASERVE_BATCH_VISIBILITY_TIMEOUT_S", "30")
    s = BatchSettings()
    assert s.visibility_timeout_s == 30
    urls = s.component_urls()
    assert urls["llm_decoder"] == "batch-llm:8001" and urls["vision_encoder"] == "shared:8001"
    monkeypatch.delenv("VITASERVE_TRITON_URL")
    with pytest.raises(ValueError, match="VITASERVE_BATCH_VISION_ENCODER_URL"):
        BatchSettings().component_urls()
    with pytest.raises(ValueError, match="item_timeout_s must be below item_lease_s"):
        BatchSettings(item_timeout_s=100, item_lease_s=50)
    with pytest.raises(ValueError, match="CHECKPOINT_DIR"):
        BatchSettings(backend="inprocess")
    for name, field in BatchSettings.model_fields.items():
        assert field.description, f"{name} is undocumented"


def test_progress_line() -> None:
    job = {"id": "j1", "status": "running", "total": "20", "started_at": "1000.0"}
    line = progress_line(job, {"ok": 9, "error": 1}, now=1060.0)
    assert line.startswith("j1 running [###############...............] 10/20  50%")
    assert "ok 9 error 1 cancelled 0" in line and "10.0 items/min eta 1m00s" in line
    assert "eta" not in progress_line({**job, "status": "done", "finished_at": "1120"}, {"ok": 20})
    assert "error: no such file" in progress_line({"id": "j", "status": "failed", "total": "0",
                                                   "error": "no such file"}, {})


def test_cli_errors_are_messages_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    missing = str(tmp_path / "no.jsonl")
    assert cli_main(["--redis-url", dead, "submit", "--manifest", missing, "--out", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["--redis-url", dead, "submit", "--folder", str(tmp_path), "--out", "o"]) == 2
    assert "needs a prompt" in capsys.readouterr().err
    assert cli_main(["--redis-url", dead, "status", "job-x"]) == 3
    assert "cannot reach Redis" in capsys.readouterr().err
    assert cli_main(["schedules", "--file", str(tmp_path / "none.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["submit"])


def test_cli_status_lists_recent_jobs(store, redis_server, capsys) -> None:  # noqa: ANN001
    job = f"listed-{os.getpid()}-{id(capsys)}"
    store.create_job(job, {"out_dir": "/tmp/x", "concurrency": 1})
    store.update_job(job, total=4, started_at=1.0)
    store.record(job, "a", {"status": "ok"})
    assert cli_main(["--redis-url", redis_server.url, "status"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(job))
    assert " queued [" in line and "1/4" in line and "ok 1 error 0 cancelled 0" in line
