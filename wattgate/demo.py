"""``wattgate demo``: the whole Wattfare flow, offline, on loopback, in one command.

Three servers in one process:

- the gateway (``create_app``) at ``http://127.0.0.1:{port}``, with a fresh
  database in a temporary folder unless ``--data`` names one;
- the built-in fake OpenRouter (``wattgate.fakeupstream``), streaming real-looking
  text with usage and cost, and answering "Connect with OpenRouter";
- "Demo Notes", a tiny example app on a second origin (``http://localhost:{port}``,
  another site than the gateway, as a real app would be): a "Connect AI budget"
  button, a budget bar, a streaming chat box and a "Convert with one grant" button,
  with the backend routes an app writes itself (its token route, its chat route, its
  grant-redeeming route) done here with plain HTTP calls holding the secret key.

The browser tests drive exactly this. Not here: anything the gateway does.
"""

from __future__ import annotations

import asyncio
import json
import errno
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aiohttp
from aiohttp import web

from .app import create_app
from .config import load_config
from .credentials import mint_credentials
from .fakeupstream import MODELS, FakeModel, FakeOpenRouter, create_fake_openrouter
from .server import ClientLimits, ServerRunner
from .templates import render
from .views.pages import STATIC
from .views.state import gateway_key

APP_NAME = "Demo Notes"
# Priced high on purpose so one chat message visibly moves the budget bar (~2 cents).
DEMO_MODEL = "wattgate/demo-chat"
DEMO_PRICE = FakeModel(prompt=Decimal("0.00001"), completion=Decimal("0.0005"),
                       request=Decimal("0.004"))
REQUESTED_CAP_USD = 1
MAX_TOKENS = 64
USER_COOKIE = "demo_user"


@dataclass
class Demo:
    gateway_url: str
    app_url: str
    fake_url: str
    publishable_key: str
    secret_key: str
    fake: FakeOpenRouter
    data_dir: Path
    gateway: web.Application
    _runners: list[web.AppRunner] = field(default_factory=list)
    _http: aiohttp.ClientSession | None = None
    _tmp: bool = False
    local_gateway_url: str = ""  # where the app's server reaches the gateway, when not gateway_url

    async def close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._http is not None:
            await self._http.close()
        if self._tmp:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class PortBusy(OSError):
    """A port the demo was told to use is taken: names it and the flag that changes it."""


def _listen(host: str, port: int, role: str = "", flag: str = "") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortBusy(e.errno, f"port {port} ({role}) is already in use on {host}: stop "
                                    f"what is using it, or pick another with {flag} PORT") \
                from None
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _serve(app: web.Application, sock: socket.socket,
                 limits: ClientLimits | None = None) -> web.AppRunner:
    # The gateway is served as `wattgate serve` serves it, client limits included.
    runner = (ServerRunner(app, limits=limits, access_log=None) if limits is not None
              else web.AppRunner(app, access_log=None))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def start_demo(*, data_dir: Path | None = None, gateway_port: int = 0, app_port: int = 0,
                     fake_port: int = 0, chunk_delay: float = 0.04,
                     clock: Callable[[], float] = time.time,
                     gateway_hostname: str | None = None, public_url: str | None = None,
                     settings: Mapping[str, str] | None = None) -> Demo:
    """Start the three servers; ports 0 pick free ones. Call ``close()`` when done.

    ``clock`` is the gateway's (tests move it to expire tokens without sleeping).
    ``gateway_hostname`` names the gateway in its public URL (a LAN or staging
    name the browser resolves to this machine); it still listens on 127.0.0.1.
    ``public_url`` is where browsers reach the gateway when something else serves it
    there (a TLS reverse proxy); ``settings`` adds ``WATTGATE_*`` settings.
    """
    tmp = data_dir is None
    data = Path(tempfile.mkdtemp(prefix="wattgate-demo-")) if data_dir is None else data_dir
    data.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    socks: list[socket.socket] = []
    try:
        for port, role, flag in ((fake_port, "the fake OpenRouter", "--fake-port"),
                                 (gateway_port, "the gateway", "--port"),
                                 (app_port, "the example app", "--app-port")):
            socks.append(_listen(host, port, role, flag))
    except OSError:
        for sock in socks:
            sock.close()
        if tmp:
            shutil.rmtree(data, ignore_errors=True)
        raise
    fake_sock, gw_sock, app_sock = socks
    fake_url = f"http://{host}:{fake_sock.getsockname()[1]}"
    local_gateway_url = f"http://{host}:{gw_sock.getsockname()[1]}"
    gateway_url = public_url.rstrip("/") if public_url else \
        f"http://{gateway_hostname or host}:{gw_sock.getsockname()[1]}"
    # "localhost" is another site than 127.0.0.1, so the app never sees the gateway's cookies.
    app_url = f"http://localhost:{app_sock.getsockname()[1]}"

    fake = FakeOpenRouter(models={**MODELS, DEMO_MODEL: DEMO_PRICE}, chunk_delay=chunk_delay,
                          record_calls=False)  # answers restate the prompt (fakemodel)
    runners = [await _serve(create_fake_openrouter(fake), fake_sock)]
    config = load_config(None, env={
        "WATTGATE_DATABASE__PATH": str(data / "wattgate.db"),
        "WATTGATE_SERVER__PUBLIC_URL": gateway_url,
        "WATTGATE_UPSTREAM__BASE_URL": fake_url + "/api/v1",
        "WATTGATE_OAUTH__AUTH_BASE": fake_url,
        "WATTGATE_OAUTH__API_BASE": fake_url + "/api/v1",
        **(settings or {}),
    })
    gateway = create_app(config, clock=clock)
    runners.append(await _serve(gateway, gw_sock, ClientLimits.from_config(config)))
    gw = gateway[gateway_key]
    creds = mint_credentials()
    await gw.store.create_app(creds.app_id, APP_NAME, gw.hash(creds.secret), [app_url],
                              now=gw.clock())
    demo = Demo(gateway_url, app_url, fake_url, creds.publishable_key, creds.secret_key, fake,
                data, gateway, runners, aiohttp.ClientSession(), tmp, local_gateway_url)
    runners.append(await _serve(example_app(demo), app_sock))
    return demo


# ---- the example app: what an app developer writes ------------------------------------
def _loads_object(text: str) -> dict[str, object]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def example_app(demo: Demo) -> web.Application:
    app = web.Application()
    http = demo._http
    assert http is not None
    secret = {"Authorization": f"Bearer {demo.secret_key}"}
    api = (demo.local_gateway_url or demo.gateway_url) + "/api/v1"

    async def index(request: web.Request) -> web.Response:
        user = request.cookies.get(USER_COOKIE) or "user_" + secrets.token_hex(4)
        config = {"gatewayURL": demo.gateway_url, "publishableKey": demo.publishable_key,
                  "user": user, "model": DEMO_MODEL}
        response = web.Response(text=render("demo-app.html", app_name=APP_NAME, user=user,
                                            gateway=demo.gateway_url,
                                            config=config),
                                content_type="text/html")
        response.set_cookie(USER_COOKIE, user, httponly=True, samesite="Lax", path="/")
        return response

    async def script(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "demo-app.js",
                                headers={"Content-Type": "text/javascript; charset=utf-8"})

    async def token_route(request: web.Request) -> web.Response:
        # The app's token route: its own login decides the user; here, a demo cookie.
        user = request.cookies.get(USER_COOKIE)
        if not user:
            return _error(401, "auth", "Not signed in to the demo app.")
        async with http.post(api + "/sessions", headers=secret, json={
                "appUserId": user, "requestLimit": {"monthlyUsd": REQUESTED_CAP_USD}}) as r:
            return web.json_response(await r.json(), status=r.status)

    async def chat(request: web.Request) -> web.StreamResponse:
        user = request.cookies.get(USER_COOKIE)
        body = await request.json(loads=_loads_object)
        message = str(body.get("message", ""))[:2000]
        if not user or not message:
            return _error(400, "invalid_request", "Type a message.")
        headers = {**secret, "x-wattfare-user": user}
        payload = {"model": DEMO_MODEL, "stream": True, "max_tokens": MAX_TOKENS,
                   "messages": [{"role": "user", "content": message}]}
        async with http.post(api + "/chat/completions", headers=headers, json=payload) as r:
            if r.status != 200:
                return web.json_response(await r.json(content_type=None), status=r.status)
            out = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                              "Cache-Control": "no-cache"})
            await out.prepare(request)
            async for text in _deltas(r.content):
                await out.write(text.encode())
            await out.write_eof()
            return out

    async def convert(request: web.Request) -> web.Response:
        body = await request.json(loads=_loads_object)
        grant = str(body.get("grantToken", ""))
        text = str(body.get("text", ""))[:2000] or "hello world"
        headers = {**secret, "x-wattfare-grant": grant}
        payload = {"model": DEMO_MODEL, "max_tokens": MAX_TOKENS, "messages": [
            {"role": "user", "content": f"Rewrite this as a headline: {text}"}]}
        async with http.post(api + "/chat/completions", headers=headers, json=payload) as r:
            data = await r.json(content_type=None)
            if r.status == 402 and data.get("error", {}).get("code") == "grant_invalid":
                return _error(402, "grant_used", "This grant is used up. Ask for a new one.")
            if r.status != 200:
                return web.json_response(data, status=r.status)
            remaining = r.headers.get("x-wattfare-grant-remaining")
        return web.json_response({"result": data["choices"][0]["message"]["content"].strip(),
                                  "remaining": int(remaining) if remaining else None})

    app.router.add_get("/", index)
    app.router.add_get("/demo-app.js", script)
    app.router.add_post("/api/wattfare-token", token_route)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/convert", convert)
    return app


async def _deltas(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The text pieces of an OpenAI-style SSE stream."""
    async for raw in stream:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if chunk.get("error"):
            yield "\n[the model stopped: " + str(chunk["error"].get("message", "error")) + "]"
            return
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def banner(demo: Demo) -> str:
    """What ``wattgate demo`` prints: where to go, as app user and as operator."""
    admin_token = demo.gateway[gateway_key].keys.admin_token
    return (f"wattgate demo is running, offline:\n\n"
            f"  Open the example app:  {demo.app_url}\n\n"
            f"  gateway:               {demo.gateway_url}  (your dashboard: "
            f"{demo.gateway_url}/account)\n"
            f"  operator console:      {demo.gateway_url}/admin\n"
            f"  console admin token:   {admin_token}\n"
            f"  fake OpenRouter:       {demo.fake_url}\n"
            f"  data:                  {demo.data_dir}"
            f"{' (deleted on exit)' if demo._tmp else ''}\n\n"
            f"Paste any key that starts with sk-or- in the consent popup, or use "
            f"\"Connect with OpenRouter\". Ctrl-C stops.")


def run(*, data_dir: Path | None, gateway_port: int, app_port: int, fake_port: int) -> int:
    """The ``wattgate demo`` command: start, print where to go, run until Ctrl-C or SIGTERM
    (either way the servers stop and a temporary data folder is removed)."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        demo = await start_demo(data_dir=data_dir, gateway_port=gateway_port,
                                app_port=app_port, fake_port=fake_port)
        try:
            print(banner(demo), flush=True)
            await stop.wait()
        finally:
            await demo.close()
        print("wattgate demo stopped" + (f"; removed {demo.data_dir}" if demo._tmp else ""),
              flush=True)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # a Ctrl-C before the handlers were in place
        pass
    return 0
