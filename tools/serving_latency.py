"""Latency, throughput and memory of a running `mlflow models serve` endpoint.

Sends the same request (``--images`` copies of one generated street-like
PNG of ``--height`` x ``--width``) from N client threads for a fixed time,
or ``--requests`` times, to a server on this machine, and reports the
median and p95 latency, the throughput and the errors. With ``--pid`` (the
`mlflow models serve` process id) it also samples the RSS of the server's
process tree every 50 ms and reports its idle value and peak. With
``--expect-status`` it checks a refusal instead (e.g. 413 for an
over-budget request) and prints the server's message. Bounded in time and
count; loopback only.

Usage:
    mlflow models serve -m models:/cs2acdc-student@serving --env-manager local -h 127.0.0.1 -p 5001 &
    python tools/serving_latency.py --url http://127.0.0.1:5001/invocations --clients 8 --seconds 30
    # the largest allowed request, once, with the server's memory:
    python tools/serving_latency.py --clients 1 --requests 1 --height 2048 --width 4096 --pid $!
    # the largest body (an incompressible 4096x2048 PNG, 24 MiB):
    python tools/serving_latency.py --clients 1 --requests 1 --height 2048 --width 4096 --noise --pid $!
    # an over-budget one (16 images of 2048x2048):
    python tools/serving_latency.py --clients 1 --requests 1 --images 16 --height 2048 --width 2048 --expect-status 413 --pid $!
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


def noise_png(height: int, width: int) -> bytes:
    """A seeded random-pixel PNG: the largest file a size can have."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request_body(height: int, width: int, images: int = 1, noise: bool = False) -> bytes:
    """JSON body of a request with ``images`` copies of one PNG: the example
    street picture (a few KB), or random pixels (incompressible)."""
    from uda.serving import example_image_png

    png = noise_png(height, width) if noise else example_image_png(height, width)
    image = base64.b64encode(png).decode()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]] * images}}).encode()


class TreeRss:
    """Peak RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.idle = self.now()
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for process in [self.root] + self.root.children(recursive=True):
            try:
                total += process.memory_info().rss
            except self._psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.now())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:5001/invocations")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="stop after this many requests in all (default: run --seconds)",
    )
    parser.add_argument("--height", type=int, default=144)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument(
        "--noise", action="store_true", help="random pixels: an incompressible PNG (the largest body)"
    )
    parser.add_argument(
        "--expect-status", type=int, default=200, help="the HTTP status that counts as success"
    )
    parser.add_argument(
        "--pid", type=int, default=None, help="the server's process id: report its tree's idle and peak RSS"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="client-side timeout per request (s)")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("this load test only targets a server on this machine (127.0.0.1 / localhost)")
    if args.clients < 1 or args.images < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--clients, --images and --requests must be at least 1")

    body = request_body(args.height, args.width, args.images, args.noise)
    latencies: list[float] = []
    errors: list[str] = []
    messages: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds
    remaining = [args.requests if args.requests is not None else MAX_REQUESTS_PER_CLIENT * args.clients]

    def take_one() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def client() -> None:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if (args.requests is None and time.perf_counter() >= deadline) or not take_one():
                return
            start = time.perf_counter()
            status, text = 0, ""
            try:
                req = urllib.request.Request(
                    args.url, data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=args.timeout) as response:
                    status, text = response.status, response.read().decode()
            except urllib.error.HTTPError as err:
                status, text = err.code, err.read().decode(errors="replace")
            except (urllib.error.URLError, OSError) as err:
                text = repr(err)
            elapsed = time.perf_counter() - start
            outcome = None
            if status != args.expect_status:
                outcome = f"HTTP {status}: {text[-300:]}"
            elif status == 200:
                try:
                    if len(json.loads(text)["predictions"]) != args.images:
                        outcome = "unexpected payload"
                except (ValueError, KeyError):
                    outcome = "unexpected payload"
            else:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                with lock:
                    messages.append(message)
            with lock:
                (errors.append(outcome) if outcome else latencies.append(elapsed))

    rss = TreeRss(args.pid) if args.pid else None
    if rss:
        rss.start()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    if rss:
        rss.stop()
    kind = "random-pixel" if args.noise else "street-like"
    print(
        f"{args.clients} clients, {wall:.1f} s, {args.images} x {args.height}x{args.width} {kind} PNG per request "
        f"({len(body):,} bytes)"
    )
    if rss:
        print(
            f"server RSS (process tree): idle {rss.idle / 2**30:.2f} GiB, peak {rss.peak / 2**30:.2f} GiB "
            f"(+{(rss.peak - rss.idle) / 2**20:.0f} MiB)"
        )
    if not latencies:
        print(f"no successful request; errors: {errors[:3]}")
        return 1
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    print(
        f"requests ok (HTTP {args.expect_status}) {len(latencies)}, errors {len(errors)}, "
        f"throughput {len(latencies) / wall:.1f} req/s"
    )
    print(
        f"latency median {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {ordered[-1] * 1000:.0f} ms"
    )
    if messages:
        print(f"message: {messages[0][-600:]}")
    if errors:
        print(f"first errors: {errors[:3]}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
