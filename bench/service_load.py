"""Load and fault test of the reference service, on loopback only.

    python bench/service_load.py [--requests 50] [--queue-size 8] [--json OUT.json]

Starts the service in a child process on 127.0.0.1 (a free port), then:
1. burst: N concurrent requests against a queue of Q (a 0.1 s stand-in model, then the
   small untrained HRNet at 64 px): answered, status counts, p50/p95/p99, queue depth over
   time, /health latency during the burst;
2. timeout: a 2 s model behind a 0.5 s timeout: the 504, and how fast the cancelled run
   let go of the model (zombies in /metrics);
3. breaker: a model failing its first 4 calls: statuses and the breaker's transitions.
Targets: every request answered, no 500 in the bursts, /health p99 under 100 ms.
Every request has a timeout and the counts are fixed, so a run is bounded (about 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from mlbench.service.fakes import make_png  # noqa: E402
from mlbench.service.load import depth_over_time, run_burst  # noqa: E402
from mlbench.service.metrics import percentiles  # noqa: E402

CHILD = """
import json, sys, torch
torch.set_num_threads(1)
import mlbench as mb
from mlbench.service import ServiceSettings, create_app, serve_in_thread
from mlbench.service.fakes import FlakyModel, SlowModel
cfg = json.loads(sys.argv[1])
models = {"slow": SlowModel(cfg["seconds"], steps=10), "flaky": FlakyModel(failing=set(cfg["fail_calls"])),
          "hrnet": mb.build_model("hrnet", "small").eval()}
settings = ServiceSettings(models=models, default_model="slow", options={"input_size": 64}, warmup=False,
                           queue_size=cfg["queue_size"], workers=cfg["workers"], timeout_s=cfg["timeout_s"],
                           max_wait_s=cfg["max_wait_s"], breaker_failures=3, breaker_cooldown_s=1.0)
with serve_in_thread(create_app(settings)) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def start_server(cfg: dict) -> tuple[subprocess.Popen, str]:
    """The service in a child process (so /health latency is measured across processes)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"the service did not start (got {url!r})")
    return proc, url


def metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", params={"format": "json"}, timeout=10).json()


def idle_health(url: str, n: int = 20) -> dict:
    """/health latency with no load: the machine's own floor, to read the burst numbers against."""
    times = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(n):
            started = time.perf_counter()
            client.get("/health")
            times.append(time.perf_counter() - started)
            time.sleep(0.02)
    result = percentiles(times)
    print(f"\n== idle /health latency ({n} probes): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.items()))
    return result


def burst(url: str, n: int, model: str) -> dict:
    report = run_burst(url, make_png(96), n=n, model=model, timeout_s=60)
    lag = metrics(url)["event_loop_lag_s"]
    print(f"\n== burst: {n} concurrent requests, model {model} ==\n{report}")
    print("  queue depth over time (s, depth):", depth_over_time(report, 0.25))
    print(f"  server event-loop lag so far: p99 {lag['p99'] * 1000:.0f} ms, max {lag['max'] * 1000:.0f} ms")
    return {**report.to_dict(), "event_loop_lag_s": lag}


def timeout_case(url: str) -> dict:
    started = time.perf_counter()
    response = httpx.post(url + "/api/v1/segment", files={"file": ("a.png", make_png(96))},
                          data={"model": "slow"}, timeout=30)
    took = time.perf_counter() - started
    zombies = []
    for _ in range(100):
        zombies.append(metrics(url)["queue"]["zombies"])
        if zombies[-1] == 0:
            break
        time.sleep(0.02)
    m = metrics(url)
    print(f"\n== timeout: status {response.status_code} after {took:.2f} s: {response.json().get('message', '')}")
    print(f"  zombie samples {zombies}; cancelled runs stopped {m['queue']['cancelled_runs_stopped']}; "
          f"model busy now {m['models']['slow']['busy']}")
    return {"status": response.status_code, "seconds": round(took, 3), "zombie_samples": zombies}


def breaker_case(url: str) -> dict:
    statuses = []
    for _ in range(12):
        r = httpx.post(url + "/api/v1/segment", files={"file": ("a.png", make_png(64))}, data={"model": "flaky"},
                       timeout=30)
        statuses.append((r.status_code, r.headers.get("retry-after")))
        time.sleep(0.25)
    transitions = metrics(url)["breakers"]["flaky"]["transitions"]
    print(f"\n== breaker: statuses (status, Retry-After) {statuses}")
    for t in transitions:
        print(f"  {t['from']:>9} -> {t['to']:<9} {t['reason']}")
    return {"statuses": statuses, "transitions": transitions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    # "slow" sleeps 0.1 s per request; the timeout case uses a second server with a 2 s model
    cfg = dict(seconds=0.1, fail_calls=[1, 2, 3, 4], queue_size=args.queue_size, workers=args.workers,
               timeout_s=0.5, max_wait_s=10.0)
    results = {}
    proc, url = start_server(cfg)
    try:
        results["idle_health_s"] = idle_health(url)
        results["burst_fake"] = burst(url, args.requests, "slow")
        results["burst_hrnet_small"] = burst(url, args.requests, "hrnet")
        results["breaker"] = breaker_case(url)
    finally:
        proc.stdin.close()
        proc.wait(30)
    proc, url = start_server({**cfg, "seconds": 2.0})
    try:
        results["timeout"] = timeout_case(url)
    finally:
        proc.stdin.close()
        proc.wait(30)
    bursts = [results["burst_fake"], results["burst_hrnet_small"]]
    checks = {"every request answered": all(b["answered"] == b["requests"] for b in bursts),
              "no 500 in the bursts": all(500 not in b["status_counts"] for b in bursts),
              "/health p99 < 100 ms": all((b["health_latency_s"]["p99"] or 0) < 0.1 for b in bursts),
              "timeout answered 504": results["timeout"]["status"] == 504}
    load = os.getloadavg()[0]
    print(f"\n== targets (machine: {os.cpu_count()} CPUs, load average {load:.1f}; client and server share them) ==")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "checks": checks}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
