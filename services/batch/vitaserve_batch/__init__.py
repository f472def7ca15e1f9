"""vitaserve batch jobs: Celery tasks that run manifests of items through the four components.

Where things live: `app.py` (the Celery app and its configuration), `tasks.py` (the thin Celery tasks),
`jobs.py` (job logic: lanes, exactly-once items, finishing), `pipeline.py` (one item through the
components), `manifest.py` and `media.py` (input), `results.py` (the output folder, atomic writes),
`store.py` (every Redis key), `schedules.py` (beat schedules from TOML), `runtime.py` (per-process event
loop and clients), `settings.py` (every environment variable), `cli.py` (`vitaserve batch ...`).
"""
