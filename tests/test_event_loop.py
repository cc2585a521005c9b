"""server.event_loop: the loop `serve` runs calls on (uvloop where installed)."""

from __future__ import annotations

import asyncio

import pytest

from wattgate.config import load_config
from wattgate.errors import ConfigError
from wattgate.server import new_event_loop

uvloop = pytest.importorskip("uvloop", reason="uvloop is a declared dependency on this "
                             "platform; its absence is checked by the asyncio case only")


def loop_kind(choice: str) -> str:
    loop = new_event_loop(choice)
    try:
        return type(loop).__module__.split(".")[0]
    finally:
        loop.close()


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_the_standard_loop():
    assert load_config(None, env={}).server_event_loop == "auto"
    assert loop_kind("auto") == "uvloop"
    assert loop_kind("uvloop") == "uvloop"
    assert loop_kind("asyncio") == "asyncio"
    loop = new_event_loop("asyncio")
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_an_unknown_loop_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="EVENT_LOOP.*expected auto, uvloop or asyncio"):
        load_config(None, env={"WATTGATE_SERVER__EVENT_LOOP": "trio"})
    assert load_config(None, env={"WATTGATE_SERVER__EVENT_LOOP": "UVLOOP"}).server_event_loop \
        == "uvloop"


def test_asking_for_uvloop_where_it_is_missing_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        new_event_loop("uvloop")
    assert loop_kind("auto") == "asyncio"
