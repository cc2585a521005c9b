"""Typed application keys: how handlers reach the long-lived parts."""

from __future__ import annotations

from aiohttp import web

from ..calls import CallService
from ..gateway import Gateway
from ..upstream import Upstream

gateway_key = web.AppKey("gateway", Gateway)
upstream_key = web.AppKey("upstream", Upstream)
calls_key = web.AppKey("calls", CallService)
