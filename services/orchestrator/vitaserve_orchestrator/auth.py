"""Tenants and API keys: who is calling, and what they may use.

Clients send their key in gRPC metadata, `authorization: Bearer <key>` (or `x-api-key: <key>`). Keys are
never stored: the keys file holds the SHA-256 of each key (hex), compared in constant time
(`hmac.compare_digest`) against the hash of the presented key. Each key maps to one tenant; each tenant
has limits (`max_streams`: concurrent Converse streams, counted across replicas by the session store;
`max_message_bytes`: largest ClientEvent; `max_turns_per_minute` / `max_streams_per_minute`: responses
started and Converse streams opened per minute, ratelimit.py), defaulting to the settings' `tenant_max_*`
(0 = no limit).

The keys file (`VITASERVE_API_KEYS_FILE`; JSON, or YAML when it ends in .yaml/.yml), e.g. a Kubernetes
Secret mounted as a file:

    {"tenants": {"acme": {"max_streams": 20, "max_message_bytes": 4194304, "max_turns_per_minute": 120}},
     "keys": [{"sha256": "<hex of sha256(key)>", "tenant": "acme", "name": "acme-prod"}]}

A tenant named by a key but absent from `tenants` gets the defaults. The file is re-read when it changes
(a rotated Secret), checked at most every `reload_interval_s` (`VITASERVE_API_KEYS_RELOAD_S`); a broken
new version is logged and the old keys stay in force. At start a broken file is an error (the process
does not start).

No keys file: auth is off, every caller is the tenant `default` with the default limits.

Hash a key for the file:  `python -m vitaserve_orchestrator.auth hash-key` (reads the key from stdin, or
`--key`), or generate one: `python -m vitaserve_orchestrator.auth new-key --tenant acme`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitaserve.errors import ResourceExhausted, Unauthenticated

from vitaserve_orchestrator.session import DEFAULT_TENANT

log = logging.getLogger(__name__)

_TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MISSING = "missing API key: send gRPC metadata 'authorization: Bearer <key>' (or 'x-api-key: <key>')"
_INVALID = "invalid API key"
# A tenant's limits: the keys file's names = Tenant's fields = the settings' tenant_<name>.
LIMITS = ("max_streams", "max_message_bytes", "max_turns_per_minute", "max_streams_per_minute")


def hash_key(key: str) -> str:
    """The form a key is stored in: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not _TENANT_NAME.match(name):
        raise ValueError(f"tenant names are 1-64 characters of A-Z a-z 0-9 _ . -, got {name!r}")
    return name


@dataclass(frozen=True)
class Tenant:
    """Who a stream belongs to, and its limits (0 = no limit of that kind)."""

    name: str
    max_streams: int = 0
    max_message_bytes: int = 0
    max_turns_per_minute: int = 0
    max_streams_per_minute: int = 0

    def check_message(self, size: int) -> None:
        """Raises `ResourceExhausted` for a client event over this tenant's message limit."""
        if self.max_message_bytes and size > self.max_message_bytes:
            raise ResourceExhausted(
                f"event is {size} bytes, over tenant {self.name!r}'s limit max_message_bytes="
                f"{self.max_message_bytes}",
                retryable=False,
            )


@dataclass(frozen=True)
class KeyTable:
    """The parsed keys file: key hashes -> tenants."""

    keys: tuple[tuple[bytes, Tenant], ...]  # (sha256 digest, tenant)

    @classmethod
    def parse(cls, data: Any, **defaults: int) -> KeyTable:
        """From the file's content, with the default limits (`LIMITS`, 0 when not given); raises
        `ValueError` naming what is wrong."""
        unknown = set(defaults) - set(LIMITS)
        if unknown:
            raise TypeError(f"unknown limits {sorted(unknown)}")
        defaults = {k: defaults.get(k, 0) for k in LIMITS}
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("the keys file must be a mapping with a 'keys' list")
        tenants: dict[str, Tenant] = {}
        for name, limits in (data.get("tenants") or {}).items():
            limits = limits or {}
            if not isinstance(limits, dict):
                raise ValueError(f"tenant {name!r}: its entry must be a mapping of limits {list(LIMITS)}")
            unknown = set(limits) - set(LIMITS)
            if unknown:
                raise ValueError(
                    f"tenant {name!r}: unknown settings {sorted(unknown)} (known: {list(LIMITS)})")
            values = {k: limits.get(k, d) for k, d in defaults.items()}
            for k, v in values.items():
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"tenant {name!r}: {k} must be an integer >= 0, got {v!r}")
            tenants[name] = Tenant(check_tenant_name(name), **values)
        keys = []
        for i, entry in enumerate(data["keys"]):
            if not isinstance(entry, dict):
                raise ValueError(f"keys[{i}] must be a mapping")
            digest = str(entry.get("sha256", "")).lower()
            if not _SHA256_HEX.match(digest):
                raise ValueError(
                    f"keys[{i}].sha256 must be 64 hex digits (python -m vitaserve_orchestrator.auth hash-key)"
                )
            name = check_tenant_name(entry.get("tenant", ""))
            tenant = tenants.get(name) or Tenant(name, **defaults)
            keys.append((bytes.fromhex(digest), tenant))
        return cls(tuple(keys))

    @classmethod
    def load(cls, path: Path, **defaults: int) -> KeyTable:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.parse(data, **defaults)

    def find(self, key: str) -> Tenant | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, tenant in self.keys:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The API key of a call's metadata, or None if it carries none."""
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue
        name = name.lower()
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and value.strip():
            return value.strip()
    return None


class Authenticator:
    """Resolves a call's metadata to its `Tenant` (see the module docstring)."""

    def __init__(
        self,
        path: Path | None,
        *,
        max_streams: int = 0,
        max_message_bytes: int = 0,
        max_turns_per_minute: int = 0,
        max_streams_per_minute: int = 0,
        reload_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._limits = {"max_streams": max_streams, "max_message_bytes": max_message_bytes,
                        "max_turns_per_minute": max_turns_per_minute,
                        "max_streams_per_minute": max_streams_per_minute}
        self._default = Tenant(DEFAULT_TENANT, **self._limits)
        self._reload_interval_s = reload_interval_s
        self._clock = clock
        self._table: KeyTable | None = None
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        if path is not None:
            self._stamp = _stamp(path)
            self._table = KeyTable.load(path, **self._limits)  # a broken file fails the start
            self._checked = clock()

    @classmethod
    def from_settings(cls, config: Any) -> Authenticator:
        return cls(config.api_keys_file, reload_interval_s=config.api_keys_reload_s,
                   **{k: getattr(config, f"tenant_{k}") for k in LIMITS})

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _maybe_reload(self) -> None:
        assert self.path is not None
        now = self._clock()
        if now - self._checked < self._reload_interval_s:
            return
        self._checked = now
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            self._table = KeyTable.load(self.path, **self._limits)
            self._stamp = stamp
            log.info("API keys reloaded from %s (%d keys)", self.path, len(self._table.keys))
        except (OSError, ValueError) as exc:
            log.error("API keys file %s is unreadable, keeping the previous keys: %s", self.path, exc)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant:
        """The caller's tenant; raises `Unauthenticated` for a missing or unknown key."""
        if self.path is None:
            return self._default
        self._maybe_reload()
        key = key_from_metadata(metadata)
        if key is None:
            raise Unauthenticated(_MISSING)
        assert self._table is not None
        tenant = self._table.find(key)
        if tenant is None:
            raise Unauthenticated(_INVALID)
        return tenant


def _stamp(path: Path) -> tuple[float, int]:
    # A Kubernetes Secret volume swaps a symlink: stat follows it, so the stamp changes with the data.
    st = path.stat()
    return st.st_mtime, st.st_size


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash-key", help="print the sha256 to put in the keys file for a key")
    h.add_argument("--key", help="the key (default: read one line from stdin, so it stays out of the shell "
                   "history)")
    n = sub.add_parser("new-key", help='generate a key; print {"key": ..., "entry": <its keys-file entry>}')
    n.add_argument("--tenant", required=True)
    n.add_argument("--name", default="")
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        key = args.key if args.key is not None else sys.stdin.readline().strip()
        if not key:
            print("no key given", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    check_tenant_name(args.tenant)
    key = "vs_" + secrets.token_urlsafe(32)
    entry = {"sha256": hash_key(key), "tenant": args.tenant, **({"name": args.name} if args.name else {})}
    print(json.dumps({"key": key, "entry": entry}))  # the key is shown once: it is stored nowhere
    return 0


if __name__ == "__main__":
    sys.exit(main())
