#!/usr/bin/env python3
"""A stand-in for the DOPD router's planner endpoints, for operator tests without workers.

GET /v1/dopd/load answers the load in the JSON file given by --load (re-read on every call, so a
test changes the load by rewriting it); GET /v1/dopd/workers lists nothing busy; POST
/v1/dopd/drain records the workers it was asked to drain and POST /v1/dopd/forecast the mean ISLs
it was sent (GET /drained lists both).
"""

import argparse
import asyncio
import json

import aiohttp.web as web


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", required=True, help="JSON file with the LoadReport to serve")
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    drained = []
    reads = {"n": 0}

    async def load(_):
        with open(a.load) as f:
            report = json.load(f)
        reads["n"] += 1
        return web.json_response(report)

    async def workers(_):
        return web.json_response({"workers": []})

    async def drain(request):
        body = await request.json()
        print(f"drain {body}", flush=True)
        drained.extend(body.get("workers", []))
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
