"""Configuration: defaults, the TOML file, the environment rule, refusals naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from wattgate.config import SETTINGS, example_toml, load_config
from wattgate.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wattgate.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_config():
    config = load_config(None, env={})
    assert config.server_host == "127.0.0.1"
    assert config.server_port == 8787
    assert config.upstream_base_url == "https://openrouter.ai/api/v1"
    assert config.sessions_ttl_seconds == 600
    assert config.limits_sessions_per_minute == 120
    assert config.limits_chat_per_minute == 30
    assert config.dev_allow_unlimited is False
    assert config.database_file == Path("wattgate.db")
    assert config.keys_path == Path("wattgate.db.keys.json")
    assert config.public_origin == "http://127.0.0.1:8787"


def test_toml_file_sets_values(tmp_path):
    path = write(tmp_path, '[server]\nport = 9000\npublic_url = "https://gw.example.com/"\n'
                           '[dev]\nallow_unlimited = true\n'
                           '[upstream]\nconnect_timeout = 3\n')
    config = load_config(path, env={})
    assert config.server_port == 9000
    assert config.public_origin == "https://gw.example.com"
    assert config.dev_allow_unlimited is True
    assert config.upstream_connect_timeout == 3.0
    assert config.source == str(path)


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "[server]\nport = 9001\n")
    assert load_config(None, env={"WATTGATE_CONFIG": str(path)}).server_port == 9001


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "[server]\nport = 9000\n[limits]\nsessions_per_minute = 5\n")
    config = load_config(path, env={"WATTGATE_SERVER__PORT": "9100",
                                    "WATTGATE_DEV__ALLOW_UNLIMITED": "yes"})
    assert config.server_port == 9100
    assert config.limits_sessions_per_minute == 5
    assert config.dev_allow_unlimited is True


def test_every_setting_has_an_environment_name():
    env = {s.env: "1" for s in SETTINGS if s.type in (int, float) and (s.minimum or 0) <= 1}
    config = load_config(None, env=env)
    for s in SETTINGS:
        if s.env in env:
            assert config.get(s.name) == 1, s.env


@pytest.mark.parametrize("text, named", [
    ("[server]\nprot = 1\n", "server.prot"),
    ("[sever]\nport = 1\n", "[sever]"),
    ("port = 1\n", "port must be inside a [section]"),
])
def test_unknown_key_or_section_is_refused_by_name(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        load_config(write(tmp_path, text), env={})


def test_unknown_environment_setting_is_refused_by_name():
    with pytest.raises(ConfigError, match="WATTGATE_SERVER__PROT"):
        load_config(None, env={"WATTGATE_SERVER__PROT": "1"})


def test_unrelated_wattgate_variables_are_not_settings():
    config = load_config(None, env={"WATTGATE_JWT_SECRET": "x", "WATTGATE_MASTER_KEY": "y"})
    assert config.server_port == 8787


@pytest.mark.parametrize("text, named", [
    ('[server]\nport = "eighty"\n', "server.port: expected int"),
    ("[server]\nport = 70000\n", "server.port: must be at most 65535"),
    ("[server]\nport = -1\n", "server.port: must be at least 0"),
    ("[server]\nport = true\n", "server.port: expected int"),
    ("[server]\nport = 80.5\n", "server.port: expected int"),
    ('[server]\npublic_url = "gw.example.com"\n', "server.public_url: expected an http"),
    ('[server]\npublic_url = "https://example.com/wattgate"\n',
     "server.public_url: expected an origin"),
    ("[sessions]\nttl_seconds = 1\n", "sessions.ttl_seconds: must be at least 10"),
    ('[dev]\nallow_unlimited = "maybe"\n', "dev.allow_unlimited: expected true or false"),
    ('[upstream]\nbase_url = "openrouter.ai"\n', "upstream.base_url: expected an http"),
    ('[upstream]\nkey_check_path = "key"\n', "upstream.key_check_path"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ('[database]\npath = ""\n', "database.path"),
])
def test_bad_values_are_refused_by_name(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize("name, value", [
    ("WATTGATE_SERVER__PORT", "80x"),
    ("WATTGATE_UPSTREAM__CONNECT_TIMEOUT", "nan"),
    ("WATTGATE_UPSTREAM__IDLE_TIMEOUT", "inf"),
    ("WATTGATE_DEV__ALLOW_UNLIMITED", "maybe"),
    ("WATTGATE_LIMITS__SESSIONS_PER_MINUTE", "0"),
])
def test_bad_environment_values_are_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(None, env={name: value})


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"), env={})


def test_log_level_is_case_insensitive():
    assert load_config(None, env={"WATTGATE_LOG__LEVEL": "DEBUG"}).log_level == "debug"


def test_replace_checks_like_loading():
    config = load_config(None, env={})
    assert config.replace(**{"server.port": 9000}).server_port == 9000
    with pytest.raises(ConfigError, match="server.port"):
        config.replace(**{"server.port": 99999})
    with pytest.raises(ConfigError, match="unknown setting"):
        config.replace(**{"server.prot": 1})


def test_keys_file_setting_moves_the_keys(tmp_path):
    config = load_config(None, env={"WATTGATE_KEYS__FILE": str(tmp_path / "k.json")})
    assert config.keys_path == tmp_path / "k.json"


def test_example_file_is_in_step_with_the_settings():
    """config.example.toml must be what example_toml() makes; regenerate it if this fails."""
    assert (ROOT / "config.example.toml").read_text().rstrip("\n") == example_toml().rstrip("\n")


def test_example_file_loads_to_the_defaults(tmp_path):
    config = load_config(ROOT / "config.example.toml", env={})
    for s in SETTINGS:
        assert config.get(s.name) == s.default, s.name


def test_a_hold_must_outlast_the_wait_for_the_upstream():
    with pytest.raises(ConfigError, match="hold_ttl_seconds .* must be longer"):
        load_config(None, env={"WATTGATE_METERING__HOLD_TTL_SECONDS": "120"})
    with pytest.raises(ConfigError, match="hold_ttl_seconds"):
        load_config(None, env={"WATTGATE_UPSTREAM__FIRST_BYTE_TIMEOUT": "1000"})
    assert load_config(None, env={"WATTGATE_METERING__HOLD_TTL_SECONDS": "131"}) \
        .metering_hold_ttl_seconds == 131
