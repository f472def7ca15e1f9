"""celery beat fires recurring jobs from the schedules file: a real beat process, a real worker, real Triton.

The schedule mixes a cron entry (not due during the test) and an interval entry every 3 s over a folder of
images; each firing is its own job (`<name>-<12 hex>`) with its own output folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitaserve_batch.harness import wait_for
from vitaserve_batch.results import read_results

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_beat_schedule_fires_folder_jobs(triton, store, env_factory, processes, media, tmp_path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(media["square"], inbox / "a.png")
    shutil.copy(media["square"], inbox / "b photo.png")
    (inbox / "notes.txt").write_text("not an image")
    schedules = tmp_path / "schedules.toml"
    schedules.write_text(f'''
[[job]]
name = "nightly"
cron = "0 3 * * *"
manifest = "{tmp_path / 'nightly.jsonl'}"
out = "{tmp_path / 'nightly'}"

[[job]]
name = "caption"
every_s = 3
folder = "{inbox}"
prompt = "Describe the image."
out = "{tmp_path / 'captions'}"
concurrency = 1
[job.options]
max_tokens = 4
''')
    env = env_factory(triton.grpc_url, schedules_file=schedules)
    listing = subprocess.run([sys.executable, "-m", "vitaserve.cli", "batch", "schedules"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert listing.returncode == 0, listing.stderr
    assert "nightly: cron '0 3 * * *'" in listing.stdout and "caption: every 3 s" in listing.stdout
    processes("worker", env, concurrency=1)
    beat = processes("beat", env)

    def caption_jobs() -> list[dict]:
        jobs = [store.job(j) for j in store.recent_jobs(100)]
        return [j for j in jobs if j and j.get("source") == "schedule:caption" and j.get("status") == "done"]

    done = wait_for(lambda: len(caption_jobs()) >= 2 and caption_jobs(), 120, "two fired jobs",
                    on_timeout=beat.log_tail)
    assert len({j["id"] for j in done}) == len(done), "each firing is a job of its own"
    for job in done[:2]:
        assert job["id"].startswith("caption-")
        out = Path(job["out_dir"])
        assert out.parent == tmp_path / "captions" and out.name == job["id"]
        rows = read_results(out)
        assert [r["id"] for r in rows] == ["a.png", "b_photo.png"]
        assert all(r["status"] == "ok" for r in rows)
        assert (out / "manifest.jsonl").exists()
    assert not any((j or {}).get("source") == "schedule:nightly"
                   for j in (store.job(x) for x in store.recent_jobs(100)))
