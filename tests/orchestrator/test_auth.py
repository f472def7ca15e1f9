"""Unit tests of tenants and API keys (auth.py): the keys file (JSON and YAML, errors named), hashed keys
found in constant time, metadata forms, auth off, reloading a rotated file, the hash-key CLI; and the
settings checks of the session store, auth and TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_config
from pydantic import ValidationError
from vitaserve.errors import ResourceExhausted, Unauthenticated
from vitaserve_orchestrator.auth import Authenticator, KeyTable, Tenant, hash_key, key_from_metadata, main

pytestmark = pytest.mark.unit


def write_keys(path: Path, keys: dict[str, str], tenants: dict[str, dict] | None = None) -> Path:
    """`keys`: plain key -> tenant (the file only ever holds their hashes)."""
    data = {"tenants": tenants or {}, "keys": [{"sha256": hash_key(k), "tenant": t} for k, t in keys.items()]}
    path.write_text(json.dumps(data))
    return path


def test_keys_file_maps_hashes_to_tenants_with_limits(tmp_path: Path) -> None:
    path = write_keys(tmp_path / "keys.json", {"key-a": "acme", "key-g": "globex"},
                      {"acme": {"max_streams": 3}})
    assert "key-a" not in path.read_text()
    auth = Authenticator(path, max_streams=10, max_message_bytes=1000)
    assert auth.enabled
    assert auth.authenticate([("authorization", "Bearer key-a")]) == Tenant("acme", 3, 1000)
    assert auth.authenticate([("x-api-key", "key-g")]) == Tenant("globex", 10, 1000)  # defaults
    assert auth.authenticate([("Authorization", "bearer  key-a ")]).name == "acme"
    with pytest.raises(Unauthenticated, match="missing API key.*authorization: Bearer"):
        auth.authenticate([("user-agent", "x")])
    with pytest.raises(Unauthenticated, match="invalid API key"):
        auth.authenticate([("authorization", "Bearer key-x")])
    with pytest.raises(Unauthenticated, match="missing"):
        auth.authenticate([("authorization", "Basic a2V5LWE=")])
    with pytest.raises(Unauthenticated):
        auth.authenticate(None)


def test_yaml_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"tenants:\n  acme: {{max_message_bytes: 512}}\nkeys:\n  - sha256: {hash_key('k')}\n"
                    "    tenant: acme\n    name: ci\n")
    assert Authenticator(path).authenticate([("x-api-key", "k")]) == Tenant("acme", 0, 512)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ([], "mapping with a 'keys' list"),
        ({"keys": [{"sha256": "abc", "tenant": "acme"}]}, r"keys\[0\].sha256 must be 64 hex"),
        ({"keys": [{"sha256": "0" * 64, "tenant": "a:b"}]}, "tenant names"),
        ({"keys": [], "tenants": {"acme": {"max_streams": -1}}}, "max_streams must be an integer"),
        ({"keys": [], "tenants": {"acme": {"max_sessions": 1}}}, "unknown settings"),
    ],
)
def test_bad_keys_files_are_named_errors(data: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        KeyTable.parse(data, max_streams=0, max_message_bytes=0)


def test_auth_off_is_one_default_tenant() -> None:
    auth = Authenticator(None, max_streams=7)
    assert not auth.enabled
    assert auth.authenticate([]) == Tenant("default", 7, 0)
    assert auth.authenticate([("authorization", "Bearer anything")]).name == "default"


def test_rotated_keys_file_is_reloaded_and_a_broken_one_ignored(tmp_path: Path) -> None:
    now = [0.0]
    path = write_keys(tmp_path / "keys.json", {"old": "acme"})
    auth = Authenticator(path, reload_interval_s=5.0, clock=lambda: now[0])
    write_keys(path, {"new": "acme"})
    os.utime(path, (1, 1))  # a different stamp even within one clock tick
    assert auth.authenticate([("x-api-key", "old")]).name == "acme"  # not re-checked yet
    now[0] = 6.0
    assert auth.authenticate([("x-api-key", "new")]).name == "acme"
    with pytest.raises(Unauthenticated):
        auth.authenticate([("x-api-key", "old")])
    path.write_text("{broken")
    now[0] = 12.0
    assert auth.authenticate([("x-api-key", "new")]).name == "acme"  # the previous keys stay
    (tmp_path / "bad.json").write_text("{broken")
    with pytest.raises(ValueError):
        Authenticator(tmp_path / "bad.json")  # at start a broken file is fatal


def test_message_limit_names_the_limit() -> None:
    Tenant("acme", max_message_bytes=0).check_message(10**9)
    with pytest.raises(ResourceExhausted, match="max_message_bytes=100") as err:
        Tenant("acme", max_message_bytes=100).check_message(101)
    assert not err.value.retryable


def test_metadata_forms() -> None:
    assert key_from_metadata([("authorization", "Bearer abc")]) == "abc"
    assert key_from_metadata([("x-api-key", " abc ")]) == "abc"
    assert key_from_metadata([("authorization-bin", b"abc")]) is None
    assert key_from_metadata([("authorization", "Bearer ")]) is None


def test_hash_key_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "--key", "secret"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("secret")
    out = subprocess.run([sys.executable, "-m", "vitaserve_orchestrator.auth", "hash-key"], input="secret\n",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == hash_key("secret") and len(out) == 64
    assert main(["new-key", "--tenant", "acme"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["entry"] == {"sha256": hash_key(made["key"]), "tenant": "acme"}


def test_settings_of_sessions_auth_and_tls(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="VITASERVE_REDIS_URL"):
        make_config(session_store="redis")
    with pytest.raises(ValidationError, match="redis://"):
        make_config(session_store="redis", redis_url="127.0.0.1:6379")
    assert make_config(session_store="redis", redis_url="redis://r:6379/0").redis_timeout_s > 0
    with pytest.raises(ValidationError, match="API_KEYS_FILE is not a file"):
        make_config(api_keys_file=tmp_path / "nope.json")
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValidationError, match="both"):
        make_config(tls_cert_file=cert)
    with pytest.raises(ValidationError, match="TLS_KEY_FILE is not a file"):
        make_config(tls_cert_file=cert, tls_key_file=tmp_path / "missing.pem")
    with pytest.raises(ValidationError, match="mTLS"):
        make_config(tls_client_ca_file=cert)


def test_the_process_refuses_to_start_with_redis_and_no_url() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITASERVE_")}
    env.update(VITASERVE_TRITON_URL="127.0.0.1:1", VITASERVE_SESSION_STORE="redis")
    done = subprocess.run([sys.executable, "-m", "vitaserve_orchestrator"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "VITASERVE_REDIS_URL" in done.stderr
