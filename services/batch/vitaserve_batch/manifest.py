"""Job manifests: JSONL in, one `Item` (or one per-line error) out per line, in order.

A manifest line is one JSON object:

    {"id": "cat-1", "images": ["img/cat.png"], "prompt": "What is in the picture?", "want_audio": true}
    {"id": "clip-7", "video": "clips/7/", "prompt": "What happens?", "max_tokens": 64}
    {"id": "q-3", "audio": "questions/3.wav"}

Fields (unknown fields are an error, so a typo never silently changes a job):
- `id` (required): 1-128 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit, unique in the
  manifest; names the item's WAV (`audio/<id>.wav`) and is half of its idempotency key (job id + item id);
- `images` (list of paths) or `image` (one path); `video`: a folder of frame images (sorted by name, one
  frame per second of video) or an animated GIF/WebP; `audio`: a WAV/FLAC/OGG file; `prompt` (or `text`):
  the question. At least one of prompt, audio, images, video; images and video exclude each other;
- options: `want_audio` (bool), `max_tokens` (1..limit), `temperature` (>= 0), `seed` (int), `max_tiles`
  (1..12: tiles per image), `system_prompt` (overrides the default one).

Relative paths are resolved against the manifest's folder. Parsing never raises for a bad line: the line
becomes a `LineError` (bad JSON, not an object, missing or bad fields, a duplicate id) that the job records
as that item's error, and the job goes on. Files are not opened here: a missing or corrupt file is an error
of that item when it runs (`media.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ItemOptions(BaseModel):
    """Per-item options; None means the job's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    want_audio: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    max_tiles: int | None = Field(None, ge=1, le=12)
    system_prompt: str | None = Field(None, min_length=1, max_length=8000)


class Item(ItemOptions):
    """One manifest line, validated. Paths are absolute."""

    id: str
    images: tuple[str, ...] = ()
    video: str | None = None
    audio: str | None = None
    prompt: str = Field("", max_length=8000)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not ID_PATTERN.match(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _check_query(self) -> Item:
        if not (self.prompt.strip() or self.audio or self.images or self.video):
            raise ValueError("the item has no query: give prompt, audio, images or video")
        if self.images and self.video:
            raise ValueError("give images or video, not both")
        return self

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ItemOptions.model_fields}


@dataclass(frozen=True)
class LineError:
    """A manifest line that is not a valid item; `id` is its own id when it had a usable one, else
    `line-<n>`."""

    id: str
    line: int
    message: str


ParsedLine = Item | LineError


@dataclass(frozen=True)
class Entry:
    """One non-blank manifest line: its 1-based number and what it parsed to."""

    line: int
    parsed: ParsedLine

    @property
    def id(self) -> str:
        return self.parsed.id


def parse_line(raw: str, *, line: int, base_dir: Path, max_tokens_limit: int) -> ParsedLine:
    """One manifest line (1-based `line` for messages) -> `Item` or `LineError`."""
    fallback = f"line-{line}"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return LineError(fallback, line, f"line {line}: bad JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(data, dict):
        return LineError(fallback, line, f"line {line}: expected a JSON object, got {type(data).__name__}")
    raw_id = data.get("id")
    own_id = raw_id if isinstance(raw_id, str) and ID_PATTERN.match(raw_id) else fallback
    fields = dict(data)
    # Aliases: `image` for a one-image list, `text` for `prompt`.
    for alias, name in (("image", "images"), ("text", "prompt")):
        if alias in fields:
            if name in fields:
                return LineError(own_id, line, f"line {line}: give {alias!r} or {name!r}, not both")
            fields[name] = fields.pop(alias)
    if isinstance(fields.get("images"), str):
        fields["images"] = [fields["images"]]
    try:
        item = Item.model_validate(fields)
    except ValidationError as exc:
        return LineError(own_id, line, f"line {line}: {_describe(exc)}")
    if item.max_tokens is not None and item.max_tokens > max_tokens_limit:
        return LineError(own_id, line, f"line {line}: max_tokens {item.max_tokens} is above the limit "
                                       f"{max_tokens_limit}")
    return item.model_copy(update={
        "images": tuple(_resolve(p, base_dir) for p in item.images),
        "video": _resolve(item.video, base_dir) if item.video else None,
        "audio": _resolve(item.audio, base_dir) if item.audio else None,
    })


def parse_manifest(
    lines: Iterable[str], *, base_dir: Path, max_tokens_limit: int = 2048, max_items: int = 100_000
) -> list[Entry]:
    """All lines of a manifest in order; blank lines are skipped, a repeated id becomes an error of the
    later line (the first keeps the id). Raises ValueError only if there are more than `max_items`."""
    out: list[Entry] = []
    seen: set[str] = set()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        if len(out) >= max_items:
            raise ValueError(f"the manifest has more than {max_items} items")
        parsed = parse_line(raw, line=n, base_dir=base_dir, max_tokens_limit=max_tokens_limit)
        if parsed.id in seen:
            first = parsed.id
            parsed = LineError(f"line-{n}", n, f"line {n}: duplicate id {first!r}")
        seen.add(parsed.id)
        out.append(Entry(n, parsed))
    return out


def read_manifest(path: Path, **kwargs: Any) -> list[Entry]:
    """`parse_manifest` of a file (UTF-8; undecodable bytes become errors of their line)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        return parse_manifest(f, base_dir=path.parent, **kwargs)


def folder_manifest(folder: Path, *, prompt: str, options: dict[str, Any] | None = None) -> Iterator[str]:
    """Manifest lines for every image in `folder` (not recursive, sorted by name): one item per image, its
    id the file name with characters outside the id alphabet replaced by '_'."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        item_id = re.sub(r"[^A-Za-z0-9._-]", "_", path.name).lstrip("._-")[:128] or "image"
        yield json.dumps({"id": item_id, "images": [str(path.resolve())], "prompt": prompt, **options})


def _resolve(path: str, base_dir: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "item"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif err["type"] == "missing":
            parts.append(f"missing field {where!r}")
        else:
            parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
