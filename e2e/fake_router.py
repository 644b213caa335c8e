#!/usr/bin/env python3
"""A stand-in for the DOPD router's planner endpoints, for operator tests without workers.

One process stands in for the router of every DopdService: the operator is given
`--router-url http://127.0.0.1:PORT/{namespace}/{name}`, so each service's calls arrive under
its own prefix and have their own load and drains.

GET /NS/NAME/v1/dopd/load answers cumulative counts, like the router: requests arrive (and
finish) at the rate in the JSON file given by --load (`{name}` in the path is the service's),
`{"requests_per_s": R, "mean_isl": I, "mean_osl": O}`, re-read on every call so a test changes the
load by rewriting it; a missing file is no load. The counts depend only on the time, never on
how often they are read. POST .../v1/dopd/drain records the workers it was asked to drain; the
load's worker views then show each as draining, with one request in flight for the first
`drain_hold_s` seconds (0 unless the load file says) and none after. POST .../v1/dopd/forecast
records the mean ISLs it was sent. GET /drained lists drains and forecasts of all services.
"""

import argparse
import asyncio
import json
import os
import time

import aiohttp.web as web


class Service:
    """The counts, drains and clock of one service's router."""

    def __init__(self, load_path):
        self.load_path = load_path
        self.start = time.monotonic()
        self.last = self.start
        self.owed = 0.0
        # Drained worker -> until when it still holds a request.
        self.holding = {}
        self.totals = {"epoch": int(time.time() * 1000), "arrived": 0, "prompt_tokens": 0,
                       "finished": 0, "failed": 0, "output_tokens": 0, "duration_s": 0.0}

    def rate(self):
        if not os.path.exists(self.load_path):
            return {}
        with open(self.load_path) as f:
            return json.load(f)

    def snapshot(self):
        rate = self.rate()
        now = time.monotonic()
        self.owed += float(rate.get("requests_per_s", 0)) * (now - self.last)
        self.last = now
        n = int(self.owed)
        self.owed -= n
        isl, osl = int(rate.get("mean_isl", 0)), int(rate.get("mean_osl", 0))
        t = self.totals
        t["arrived"] += n
        t["prompt_tokens"] += n * isl
        t["finished"] += n
        t["output_tokens"] += n * osl
        t["duration_s"] += n * 1.0
        views = [{"url": u, "worker_id": u, "role": "decode", "healthy": True, "draining": True,
                  "in_flight": 1 if now < until else 0, "outstanding_tokens": 0,
                  "kv_blocks_used": None, "kv_blocks_free": None, "waiting": None,
                  "kv_degraded": None}
                 for u, until in self.holding.items()]
        return {**t, "router_waiting": 0, "uptime_s": now - self.start, "workers": views}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", required=True,
                    help="JSON file with the request rate and lengths to serve; {name} is the service's name")
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    services = {}
    drained = []
    forecasts = []

    def service(request):
        ns, name = request.match_info["ns"], request.match_info["name"]
        key = f"{ns}/{name}"
        if key not in services:
            services[key] = Service(a.load.replace("{name}", name))
        return services[key]

    async def load(request):
        return web.json_response(service(request).snapshot())

    async def workers(_):
        return web.json_response({"workers": []})

    async def drain(request):
        svc = service(request)
        body = await request.json()
        print(f"drain {request.path} {body}", flush=True)
        drained.extend(body.get("workers", []))
        hold = float(svc.rate().get("drain_hold_s", 0))
        for u in body.get("workers", []):
            svc.holding.setdefault(u, time.monotonic() + hold)
        return web.json_response({"draining": []})

    async def forecast(request):
        service(request)
        body = await request.json()
        forecasts.append(body.get("mean_isl"))
        return web.json_response({"threshold": body.get("mean_isl")})

    async def show(_):
        return web.json_response({"drained": drained, "forecasts": forecasts})

    app = web.Application()
    app.router.add_get("/{ns}/{name}/v1/dopd/load", load)
    app.router.add_get("/{ns}/{name}/v1/dopd/workers", workers)
    app.router.add_post("/{ns}/{name}/v1/dopd/drain", drain)
    app.router.add_post("/{ns}/{name}/v1/dopd/forecast", forecast)
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
