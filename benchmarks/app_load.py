"""Load on the demo app, as programs send it: clients x requests through gradio_client, mixed
text → image, image → text and alignment maps; requests/s, latency p50/p95, errors, and the
server's memory (RSS) over the run. First, one visitor alone: round trip against the server's own
time (the status line's), per kind, the difference being what the protocol and payloads cost.

Every caption is distinct and query images are drawn from a folder, so no answer repeats. The
clients run in this process, on the server's machine: on a small one they take CPU from it.
gradio_client builds a TLS context for every HTTP request (~45 ms of CPU on a 2-core machine),
even for an http:// URL, where no TLS is used; for http URLs the load and the single visitor's
second pass leave that out (``ssl_verify=False``), and ``--client-tls-contexts`` puts it back.

    python benchmarks/app_load.py                        # starts python app.py, 20 x 50 requests
    python benchmarks/app_load.py --clients 2 --requests 5 --single 3        # a quick check
    python benchmarks/app_load.py --url http://127.0.0.1:7860/ --pid 1234    # a running app
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import stats_ms, write_report
from gradio_client import Client, handle_file
from query_latency import queries

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("text_to_image", "image_to_text", "maps")
MIX = (76, 20, 4)  # percent of requests, in the order of KINDS
SERVER_MS = re.compile(r" in (\d+) ms")


@dataclass
class Outcome:
    kind: str
    seconds: float
    server_ms: float | None = None
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(app_args: list[str], timeout: float) -> tuple[subprocess.Popen, str, Path]:
    """``python app.py`` on a free port; returns the process, its URL and its log."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="hat-app-load-")) / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), *app_args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return process, url, log
        except OSError:
            time.sleep(1)
    process.kill()
    sys.exit(f"the app did not answer within {timeout:.0f} s (log: {log})")


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far; NaN without a process."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemorySampler(threading.Thread):
    """The server's RSS every ``every`` seconds, with the time since the sampler started."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self.start_time = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic() - self.start_time, rss_mb(self.pid)))
            self.done.wait(self.every)


class Visitor:
    """One client (one session) sending requests of each kind."""

    def __init__(self, url: str, images: list[Path], ssl_verify: bool, downloads: Path):
        self.client = Client(url, verbose=False, ssl_verify=ssl_verify, download_files=downloads)
        self.images = images

    def send(self, kind: str, caption: str, rng: random.Random) -> Outcome:
        start = time.perf_counter()
        try:
            if kind == "text_to_image":
                status = self.client.predict(caption, 8, "built-in", api_name="/search_text")[2]
            elif kind == "image_to_text":
                query = handle_file(str(rng.choice(self.images)))
                status = self.client.predict(query, 8, "built-in", api_name="/search_image")[1]
            else:
                query = handle_file(str(rng.choice(self.images)))
                self.client.predict(query, caption, api_name="/alignment_maps")
                status = ""
        except Exception as exc:  # an error is a result here: counted and reported
            return Outcome(kind, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
        found = SERVER_MS.search(status)
        server_ms = float(found[1]) if found else None
        return Outcome(kind, time.perf_counter() - start, server_ms)


def plan(total: int, rng: random.Random) -> list[str]:
    """``total`` request kinds in the proportions of :data:`MIX`, shuffled."""
    counts = [round(total * share / 100) for share in MIX]
    counts[0] += total - sum(counts)
    kinds = [kind for kind, n in zip(KINDS, counts, strict=True) for _ in range(n)]
    rng.shuffle(kinds)
    return kinds


def summary(outcomes: list[Outcome]) -> dict:
    done = [o for o in outcomes if o.error is None]
    out: dict = {"requests": len(outcomes), "errors": len(outcomes) - len(done)}
    if done:
        out["latency"] = stats_ms([o.seconds for o in done])
    for kind in KINDS:
        mine = [o for o in done if o.kind == kind]
        if mine:
            out[kind] = stats_ms([o.seconds for o in mine])
    return out


def single_visitor(url, pid, images, n: int, ssl_verify: bool, downloads: Path) -> dict:
    """``n`` requests of each searching kind, one at a time: round trip, server time, overhead,
    and the CPU time they took in the server and in this client, per request."""
    visitor, rng, result = Visitor(url, images, ssl_verify, downloads), random.Random(1), {}
    captions = queries(n)
    for kind in KINDS[:2]:
        server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
        outcomes = [visitor.send(kind, captions[i], rng) for i in range(n)]
        server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
        timed = [o for o in outcomes if o.error is None and o.server_ms is not None]
        if not timed:
            result[kind] = {"errors": [o.error for o in outcomes][:3]}
            continue
        round_trip = np.array([o.seconds * 1000 for o in timed])
        server = np.array([o.server_ms for o in timed])
        result[kind] = {
            "round_trip_p50_ms": round(float(np.median(round_trip)), 1),
            "server_p50_ms": round(float(np.median(server)), 1),
            "overhead_p50_ms": round(float(np.median(round_trip - server)), 1),
            "server_cpu_ms_per_request": round(server_cpu * 1000 / n, 1),
            "client_cpu_ms_per_request": round(client_cpu * 1000 / n, 1),
            "errors": len(outcomes) - len(timed),
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a running app (default: start python app.py)")
    parser.add_argument("--pid", type=int, help="the running app's process, for its memory")
    parser.add_argument("--app-args", default="", help="arguments for the started app.py")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--single", type=int, default=21, help="one visitor's requests per kind")
    parser.add_argument("--images", default=str(ROOT / "assets" / "gallery" / "images"))
    parser.add_argument(
        "--client-tls-contexts",
        action="store_true",
        help=("let gradio_client build a TLS context per request even for http:// (its default)"),
    )
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between RSS reads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    images = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not images:
        sys.exit(f"no .jpg or .png query images below {args.images}")
    process = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        process, url, _ = launch(shlex.split(args.app_args), args.start_timeout)
        pid = process.pid
    lean = url.startswith("http://") and not args.client_tls_contexts
    downloads = Path(tempfile.mkdtemp(prefix="hat-app-load-downloads-"))
    sampler = MemorySampler(pid, args.sample_every) if pid else None
    report: dict = {"url": url, "mix_percent": dict(zip(KINDS, MIX, strict=True))}
    try:
        if sampler:
            sampler.start()
        warm = Visitor(url, images, True, downloads)
        for kind, caption in zip(KINDS, queries(len(KINDS)), strict=True):
            warm.send(kind, f"warm-up: {caption}", random.Random(0))
        report["single_visitor"] = {
            "gradio_client_default": single_visitor(url, pid, images, args.single, True, downloads)
        }
        if lean:
            report["single_visitor"]["no_tls_contexts"] = single_visitor(
                url, pid, images, args.single, False, downloads
            )
        rng = random.Random(args.seed)
        kinds = plan(args.clients * args.requests, rng)
        captions = queries(len(kinds))
        jobs = [
            (kinds[i :: args.clients], captions[i :: args.clients], random.Random(args.seed + i))
            for i in range(args.clients)
        ]
        rss_before = rss_mb(pid) if pid else None

        def client_run(job) -> list[Outcome]:
            kinds, captions, rng = job
            visitor = Visitor(url, images, not lean, downloads)
            return [visitor.send(k, c, rng) for k, c in zip(kinds, captions, strict=True)]

        start = time.monotonic()
        load_started = time.monotonic() - sampler.start_time if sampler else 0.0
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = [o for result in pool.map(client_run, jobs) for o in result]
        wall = time.monotonic() - start
    finally:
        if sampler:
            sampler.done.set()
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    load = summary(outcomes)
    load.update(
        clients=args.clients,
        wall_s=round(wall, 1),
        requests_per_s=round(len(outcomes) / wall, 2),
        client_tls_contexts=not lean,
        first_errors=[o.error for o in outcomes if o.error][:5],
    )
    report["load"] = load
    if sampler:
        during = [mb for t, mb in sampler.samples if t >= load_started]
        quarters = np.array_split(np.asarray(during), 4) if during else []
        report["server_rss_mb"] = {
            "before_load": round(rss_before, 1),
            "max_in_each_quarter_of_the_load": [
                round(float(q.max()), 1) for q in quarters if q.size
            ],
            "end": round(during[-1], 1) if during else None,
            "samples": [(round(t, 1), round(mb, 1)) for t, mb in sampler.samples],
        }
    print_report(report)
    write_report("app_load", report, args.out)
    return report


def print_report(report: dict) -> None:
    for variant, kinds in report["single_visitor"].items():
        for kind, figures in kinds.items():
            print(f"one visitor ({variant}), {kind}: {figures}")
    load = report["load"]
    print(
        f"load: {load['clients']} clients, {load['requests']} requests in {load['wall_s']} s = "
        f"{load['requests_per_s']} requests/s, {load['errors']} errors; latency "
        f"{load.get('latency')}"
    )
    for kind in KINDS:
        if kind in load:
            print(f"  {kind}: {load[kind]}")
    for error in load["first_errors"]:
        print(f"  error: {error}")
    if "server_rss_mb" in report:
        rss = report["server_rss_mb"]
        print(
            f"server RSS: {rss['before_load']} MB before the load, max per quarter of it "
            f"{rss['max_in_each_quarter_of_the_load']} MB, {rss['end']} MB at the end"
        )


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
