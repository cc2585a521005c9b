"""What each metering step of one call costs, measured in-process, without HTTP.

    python bench/steps.py [--variant NAME] [--n 1500] [--database-url URL]

It builds a real ``Gateway`` (keys file, SQLite store, or the PostgreSQL
ledger at ``--database-url``: a fresh, empty database) on a temporary folder
with one app and one connected user, then runs the metered path's own steps
in order, call after call, as ``wattgate/calls.py`` does: authenticate
the secret key, identify the payer and pre-check the connection, take the
rate limit, parse the body, price it, admit (hold in memory + unseal), write
the hold's row with the generation id (every call is streamed upstream), read
the usage and assemble the whole answer, bill, settle (debit commit). Each
step's median in µs is printed as one JSON
object: the part of wattgate's cost that a bare hop does not have.

On a shared machine the medians are steadier than load-test figures because
no socket and no other process is involved.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "openai/gpt-4o-mini"
FUNDING_KEY = "sk-or-v1-" + "b" * 48
REQUEST = json.dumps({"model": MODEL, "stream": False,
                      "messages": [{"role": "user", "content": "Hello, how are you?"}]}).encode()
USAGE = ('{"prompt_tokens":13,"completion_tokens":8,"total_tokens":21,"cost":0.0000069,'
         '"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},'
         '"cost_details":{"upstream_inference_cost":0.0000069},'
         '"completion_tokens_details":{"reasoning_tokens":0}}')
ANSWER = ('{"id":"gen-%s","object":"chat.completion","created":1763800000,"model":"%s",'
          '"provider":"Fake","choices":[{"index":0,"logprobs":null,"finish_reason":"stop",'
          '"message":{"role":"assistant","content":"Metering is the quiet part of every AI '
          'feature: each token has a price,"}}],"usage":%s}')


def sse_answer(gen: str) -> list[bytes]:
    head = '{"id":"%s","provider":"Fake","model":"%s","object":"chat.completion.chunk",' \
           '"created":1763800000,' % (gen, MODEL)
    chunks = [b": OPENROUTER PROCESSING\n\n"]
    for word in "Metering is the quiet part of every AI feature".split():
        chunks.append(("data: " + head + '"choices":[{"index":0,"delta":{"content":"%s "},'
                       '"finish_reason":null,"logprobs":null}]}\n\n' % word).encode())
    chunks.append(("data: " + head + '"choices":[],"usage":%s}\n\n' % USAGE).encode())
    chunks.append(b"data: [DONE]\n\n")
    return chunks


async def measure(n: int, database_url: str = "") -> dict[str, Any]:
    from wattgate import admission
    from wattgate.assemble import Assembler
    from wattgate.config import load_config
    from wattgate.credentials import mint_credentials
    from wattgate.gateway import open_gateway
    from wattgate.metering import bill, usage_row
    from wattgate.pricing import PriceList
    from wattgate.sealing import connection_aad
    from wattgate.sse import StreamReader, parse_json_body
    from wattgate.store import ACTIVE
    from wattgate.estimate import plan, read_request

    tmp = Path(tempfile.mkdtemp(prefix="wattgate-steps-"))
    config = load_config(None, env={"WATTGATE_DATABASE__PATH": str(tmp / "steps.db"),
                                    "WATTGATE_DATABASE__URL": database_url,
                                    "WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000000000"})
    gw = await open_gateway(config)
    creds = mint_credentials()
    now = time.time()
    await gw.store.create_app(creds.app_id, "steps", gw.hash(creds.secret),
                              ["http://localhost:3000"], now=now)
    await gw.store.save_connection(
        creds.app_id, "u1", state=ACTIVE, cap_nanos=10**18, sealed_key=None, browser_hash=None,
        now=now, seal=lambda cid: gw.sealer.seal(FUNDING_KEY, aad=connection_aad(cid)))
    prices = PriceList(ttl=600)
    prices.load({"data": [{"id": MODEL, "pricing": {"prompt": "0.00000015",
                                                    "completion": "0.0000006",
                                                    "request": "0"}}]}, now=now)
    times: dict[str, list[float]] = {}
    takes_connection = "connection" in inspect.signature(admission.admit).parameters

    def admit_extra(connection: Any) -> dict[str, Any]:
        return {"connection": connection} if takes_connection else {}

    def lap(name: str, t0: int) -> int:
        t1 = time.perf_counter_ns()
        times.setdefault(name, []).append((t1 - t0) / 1000)
        return t1

    loop = asyncio.get_running_loop()
    for i in range(n + 50):
        if i == 50:
            times.clear()  # warm-up done
            cpu0 = time.process_time_ns()
        t = time.perf_counter_ns()
        app = await gw.app_for_secret(creds.secret_key)
        t = lap("authenticate secret key", t)
        payer = admission.identify("u1", None)
        connection = await admission.precheck(gw, app.app_id, payer)
        t = lap("identify payer + pre-check connection", t)
        await gw.limit("RL_CHAT", f"{app.app_id}:{payer.rate_key}")
        t = lap("rate limit", t)
        req = read_request(REQUEST, default_max_tokens=4096)
        t = lap("parse body, check its fields", t)
        planned = plan(req, prices, stream_upstream=True, send_max_price=True)
        estimate, model = planned.worst_nanos, req.model
        t = lap("price the worst case, inject max_tokens and max_price", t)
        admitted = await admission.admit(gw, app.app_id, payer, estimate, now=time.time(),
                                         **admit_extra(connection))
        t = lap("admit: hold + unseal", t)
        gen = f"{i:024x}"
        # Every call is streamed upstream: its hold row names the generation (one commit).
        noted = gw.store.note_generation(admitted.hold, "gen-" + gen, app.app_id, model)
        if noted is not None:
            await noted
        t = lap("hold row with the generation id (commit)", t)
        reader = StreamReader("gen-" + gen)
        assembler = Assembler()
        for chunk in sse_answer("gen-" + gen):
            reader.feed(chunk)
            assembler.feed(chunk)
        outcome = reader.close()
        json.dumps(assembler.answer())
        t = lap("read usage + assemble a whole answer (11 events)", t)
        reader = StreamReader("gen-" + gen)
        for chunk in sse_answer("gen-" + gen):
            reader.feed(chunk)
        reader.close()
        t = lap("streamed only: read usage (11 events)", t)
        parse_json_body((ANSWER % (gen, MODEL, USAGE)).encode(), "gen-" + gen)
        t = lap("(read usage of a JSON answer, stream_whole_answers = false)", t)
        row = usage_row(outcome, bill(outcome, estimate), app_id=app.app_id,
                        connection_id=admitted.connection_id, grant_id=None, model=model,
                        status="ok", started=now, now=time.time(),
                        admitted_at=admitted.admitted_at)
        t = lap("bill + ledger row", t)
        await gw.store.settle(admitted.hold, row, admitted.period)
        t = lap("settle: debit commit", t)
    # This process's CPU (the gateway's share; a database server's is not in it).
    times["(process CPU per call, all steps)"] = [(time.process_time_ns() - cpu0) / n / 1000]
    t = time.perf_counter_ns()
    for _ in range(n):
        if database_url:
            async with gw.store._tx():
                pass
        else:
            await gw.store._writer.run(lambda db: None)
        t = lap("(an empty ledger transaction)", t)
    for _ in range(n):
        await loop.run_in_executor(None, int)
        t = lap("(a bare thread round trip)", t)
    await gw.store.close()
    medians = {k: round(statistics.median(v), 1) for k, v in times.items()}
    medians["total, non-streamed call"] = round(sum(
        v for k, v in medians.items()
        if not k.startswith(("(", "streamed only"))), 1)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="")
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--database-url", default="",
                        help="measure the PostgreSQL ledger on this (empty) database")
    args = parser.parse_args()
    if args.variant:
        sys.path.insert(0, str(Path(__file__).parent))
        import variants

        variants.apply(args.variant)
    json.dump(asyncio.run(measure(args.n, args.database_url)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
