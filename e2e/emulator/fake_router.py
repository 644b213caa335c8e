#!/usr/bin/env python3
"""A stand-in for the DOPD router's planner endpoints, for operator tests without workers.

GET /v1/dopd/load answers cumulative counts, like the router: requests arrive (and finish) at the
rate in the JSON file given by --load, `{"requests_per_s": R, "mean_isl": I, "mean_osl": O}`,
re-read on every call so a test changes the load by rewriting it. The counts depend only on the
time, never on how often they are read. POST /v1/dopd/drain records the workers it was asked to
drain; the load's worker views then show each as draining, with one request in flight for the
first `drain_hold_s` seconds (0 unless the load file says) and none after. POST
/v1/dopd/forecast records the mean ISLs it was sent (GET /drained lists both).
"""

import argparse
import asyncio
import json
import time

import aiohttp.web as web


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", required=True, help="JSON file with the request rate and lengths to serve")
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    drained = []
    # Drained worker -> until when it still holds a request.
    holding = {}
    reads = {"n": 0}
    start = time.monotonic()
    totals = {"epoch": int(time.time() * 1000), "arrived": 0, "prompt_tokens": 0, "finished": 0,
              "failed": 0, "output_tokens": 0, "duration_s": 0.0}
    clock = {"last": start, "owed": 0.0}

    async def load(_):
        with open(a.load) as f:
            rate = json.load(f)
        now = time.monotonic()
        clock["owed"] += float(rate.get("requests_per_s", 0)) * (now - clock["last"])
        clock["last"] = now
        n = int(clock["owed"])
        clock["owed"] -= n
        isl, osl = int(rate.get("mean_isl", 0)), int(rate.get("mean_osl", 0))
        totals["arrived"] += n
        totals["prompt_tokens"] += n * isl
        totals["finished"] += n
        totals["output_tokens"] += n * osl
        totals["duration_s"] += n * 1.0
        reads["n"] += 1
        views = [{"url": u, "worker_id": u, "role": "decode", "healthy": True, "draining": True,
                  "in_flight": 1 if now < until else 0, "outstanding_tokens": 0,
                  "kv_blocks_used": None, "kv_blocks_free": None, "waiting": None,
                  "kv_degraded": None}
                 for u, until in holding.items()]
        return web.json_response({**totals, "router_waiting": 0, "uptime_s": now - start,
                                  "workers": views})

    async def workers(_):
        return web.json_response({"workers": []})

    async def drain(request):
        body = await request.json()
        print(f"drain {body}", flush=True)
        drained.extend(body.get("workers", []))
        with open(a.load) as f:
            hold = float(json.load(f).get("drain_hold_s", 0))
        for u in body.get("workers", []):
            holding.setdefault(u, time.monotonic() + hold)
        return web.json_response({"draining": []})

    forecasts = []

    async def forecast(request):
        body = await request.json()
        forecasts.append(body.get("mean_isl"))
        return web.json_response({"threshold": body.get("mean_isl")})

    async def show(_):
        return web.json_response({"drained": drained, "load_reads": reads["n"], "forecasts": forecasts})

    app = web.Application()
    app.router.add_get("/v1/dopd/load", load)
    app.router.add_get("/v1/dopd/workers", workers)
    app.router.add_post("/v1/dopd/drain", drain)
    app.router.add_post("/v1/dopd/forecast", forecast)
    app.router.add_get("/drained", show)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    with open(a.port_file, "w") as f:
        f.write(str(port))
    print(f"fake router: http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
