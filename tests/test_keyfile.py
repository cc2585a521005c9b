"""The keys file: created 0600 on first use, reused afterwards, overridden by the environment."""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat

import pytest

from wattgate.errors import ConfigError
from wattgate.keyfile import _fresh, add_master_key, check_strong, load_keys


def test_created_with_mode_0600(tmp_path):
    path = tmp_path / "data" / "wattgate.db.keys.json"
    keys = load_keys(path, env={})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(keys.active_master_key) == 32
    assert len(keys.hash_key) == 32
    assert keys.jwt_secret and keys.admin_token
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_created_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "k.json"
        load_keys(path, env={})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_reused_on_second_start(tmp_path):
    path = tmp_path / "k.json"
    first = load_keys(path, env={})
    second = load_keys(path, env={})
    assert second == first


def test_an_existing_file_is_never_overwritten_by_creation(tmp_path):
    path = tmp_path / "k.json"
    first = load_keys(path, env={})
    # A second process racing on an empty folder ends up with the same keys.
    assert load_keys(path, env={}, create=True).master_keys == first.master_keys


JWT_FROM_ENV = "jwt-from-env-" + "Kq3vT8xZ1mN6bR4wY9cD2fG7"
ADMIN_FROM_ENV = "admin-from-env-" + "Lp5sH2jW8eA3uQ6kV1zX9yB4"


def test_environment_overrides(tmp_path):
    master = base64.b64encode(b"m" * 32).decode()
    hash_key = base64.b64encode(b"h" * 32).decode()
    keys = load_keys(tmp_path / "k.json", env={
        "WATTGATE_JWT_SECRET": JWT_FROM_ENV, "WATTGATE_HASH_KEY": hash_key,
        "WATTGATE_MASTER_KEY": master, "WATTGATE_ADMIN_TOKEN": ADMIN_FROM_ENV})
    assert keys.jwt_secret == JWT_FROM_ENV
    assert keys.hash_key == b"h" * 32
    assert keys.active_key_id == "env" and keys.active_master_key == b"m" * 32
    assert "k1" in keys.master_keys  # file keys stay, so older sealed values still open
    assert keys.admin_token == ADMIN_FROM_ENV
    on_disk = json.loads((tmp_path / "k.json").read_text())
    assert JWT_FROM_ENV not in json.dumps(on_disk)


@pytest.mark.parametrize("env, named", [
    ({"WATTGATE_MASTER_KEY": "not base64!"}, "WATTGATE_MASTER_KEY"),
    ({"WATTGATE_MASTER_KEY": base64.b64encode(b"short").decode()}, "32 bytes"),
    ({"WATTGATE_HASH_KEY": "%%%"}, "WATTGATE_HASH_KEY"),
    ({"WATTGATE_HASH_KEY": base64.b64encode(b"short").decode()}, "WATTGATE_HASH_KEY"),
    ({"WATTGATE_ADMIN_TOKEN": "4821"}, "WATTGATE_ADMIN_TOKEN is too weak"),
    ({"WATTGATE_ADMIN_TOKEN": "correct-horse"}, "WATTGATE_ADMIN_TOKEN is too weak"),
    ({"WATTGATE_ADMIN_TOKEN": "a" * 64}, "WATTGATE_ADMIN_TOKEN is too weak"),
    ({"WATTGATE_ADMIN_TOKEN": "0123456789" * 4}, "WATTGATE_ADMIN_TOKEN is too weak"),
    ({"WATTGATE_JWT_SECRET": "jwt-secret"}, "WATTGATE_JWT_SECRET is too weak"),
])
def test_bad_environment_keys_are_refused(tmp_path, env, named):
    with pytest.raises(ConfigError, match=named):
        load_keys(tmp_path / "k.json", env=env)


def test_damaged_file_is_a_clear_error(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read keys file"):
        load_keys(path, env={})
    path.write_text('{"jwt_secret": "x"}')
    with pytest.raises(ConfigError, match="missing fields"):
        load_keys(path, env={})


def test_missing_file_without_create(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_keys(tmp_path / "k.json", env={}, create=False)


def test_uncreatable_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="cannot create keys file"):
        load_keys(tmp_path / "afile" / "k.json", env={})


def test_add_master_key_persists_and_keeps_the_old_ones(tmp_path):
    path = tmp_path / "k.json"
    keys = load_keys(path, env={})
    old = dict(keys.master_keys)
    kid = add_master_key(keys)
    assert kid != "k1" and keys.active_key_id == kid
    reloaded = load_keys(path, env={})
    assert reloaded.active_key_id == kid
    assert reloaded.master_keys["k1"] == old["k1"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_keys_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "k.json"
    load_keys(path, env={})
    assert not caplog.records
    os.chmod(path, 0o644)
    load_keys(path, env={})
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_generated_and_usual_random_secrets_are_strong_enough():
    for _ in range(200):
        for value in (_fresh()["admin_token"], _fresh()["jwt_secret"], secrets.token_hex(16),
                      secrets.token_urlsafe(32), base64.b64encode(secrets.token_bytes(32)).decode()):
            check_strong(value, "x")


def test_a_weak_token_in_the_keys_file_is_refused_naming_the_file_not_the_token(tmp_path):
    path = tmp_path / "k.json"
    load_keys(path, env={})
    data = json.loads(path.read_text())
    data["admin_token"] = "hunter2hunter2"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_keys(path, env={})
    assert "admin_token is too weak" in str(e.value) and "hunter2" not in str(e.value)
