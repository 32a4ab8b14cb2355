"""Latency of a running `mlflow models serve` endpoint under concurrent clients.

Sends the same one-image request from N client threads for a fixed time to
a server on this machine and reports the median and p95 latency, the
throughput and the errors. Bounded in time and count; loopback only.

Usage:
    mlflow models serve -m models:/cs2acdc-student@serving --env-manager local -h 127.0.0.1 -p 5001 &
    python tools/serving_latency.py --url http://127.0.0.1:5001/invocations --clients 8 --seconds 30
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MAX_REQUESTS_PER_CLIENT = 100_000


def request_body(height: int, width: int) -> bytes:
    from uda.serving import example_image_png

    image = base64.b64encode(example_image_png(height, width)).decode()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}}).encode()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:5001/invocations")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--height", type=int, default=144)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("this load test only targets a server on this machine (127.0.0.1 / localhost)")

    body = request_body(args.height, args.width)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds

    def client() -> None:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                return
            start = time.perf_counter()
            try:
                req = urllib.request.Request(args.url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as response:
                    payload = json.loads(response.read())
                ok = len(payload["predictions"]) == 1
                outcome = None if ok else "unexpected payload"
            except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
                outcome = repr(err)
            elapsed = time.perf_counter() - start
            with lock:
                (errors.append(outcome) if outcome else latencies.append(elapsed))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    if not latencies:
        print(f"no successful request; errors: {errors[:3]}")
        return 1
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    print(f"{args.clients} clients, {wall:.1f} s, {args.height}x{args.width} PNG per request")
    print(f"requests ok {len(latencies)}, errors {len(errors)}, throughput {len(latencies) / wall:.1f} req/s")
    print(f"latency median {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"max {ordered[-1] * 1000:.0f} ms")
    if errors:
        print(f"first errors: {errors[:3]}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
