"""Load and fault test of the reference service, on loopback only.

    python bench/service_load.py [--requests 50] [--queue-size 8] [--executor thread|process]
                                 [--input-size 256] [--image-size 512] [--json OUT.json]

Starts the service in a child process on 127.0.0.1 (a free port), then:
1. burst: N concurrent requests against a queue of Q (a 0.1 s stand-in model, then the
   small untrained HRNet and CBAM-ResUNet on 512 px images at the service's 256 px input, warmed up): answered, status counts,
   p50/p95/p99, queue depth over time, /health latency during the burst against the
   100 ms target, with the load average (the machine may be shared);
2. timeout: a 2 s model behind a 0.5 s timeout: the 504, and how fast the cancelled run
   let go of the model (zombies in /metrics);
3. breaker: a model failing its 4 calls after the warm-up: statuses and the breaker's transitions.
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
          "hrnet": mb.build_model("hrnet", "small").eval(), "cbam_resunet": mb.build_model("cbam_resunet", "small").eval()}
settings = ServiceSettings(models=models, default_model="slow", options={"input_size": cfg["input_size"]}, warmup=True,
                           queue_size=cfg["queue_size"], workers=cfg["workers"], timeout_s=cfg["timeout_s"],
                           executor=cfg["executor"], worker_threads=1, freeze_gc=True,
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
    deadline = time.monotonic() + 120
    while httpx.get(url + "/readyz", timeout=10).status_code != 200:  # models warmed up, as in production
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the service did not become ready within 120 s")
        time.sleep(0.1)
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


def burst(url: str, n: int, model: str, side: int = 96) -> dict:
    load = os.getloadavg()[0]
    report = run_burst(url, make_png(side), n=n, model=model, timeout_s=120)
    lag = metrics(url)["event_loop_lag_s"]
    p99 = report.to_dict()["health_latency_s"]["p99"] or 0.0
    print(f"\n== burst: {n} concurrent requests, model {model} (load average {load:.1f} before) ==\n{report}")
    print("  queue depth over time (s, depth):", depth_over_time(report, 0.25))
    print(f"  server event-loop lag so far: p99 {lag['p99'] * 1000:.0f} ms, max {lag['max'] * 1000:.0f} ms")
    print(f"  /health p99 {p99 * 1000:.0f} ms against the 100 ms target: {'PASS' if p99 < 0.1 else 'FAIL'}")
    return {**report.to_dict(), "event_loop_lag_s": lag, "load_average": round(load, 2)}


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
    parser.add_argument("--executor", default="process", choices=["process", "thread"],
                        help="run inference in worker threads or in worker processes")
    parser.add_argument("--input-size", type=int, default=256, help="model input side (the service's default: 256)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the images the model bursts send")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    # "slow" sleeps 0.1 s per request; the timeout case uses a second server with a 2 s model
    # call 1 of "flaky" is the warm-up, so the 4 injected failures come after it
    cfg = dict(seconds=0.1, fail_calls=[2, 3, 4, 5], queue_size=args.queue_size, workers=args.workers,
               executor=args.executor, input_size=args.input_size,
               timeout_s=0.5, max_wait_s=10.0)
    results = {}
    proc, url = start_server(cfg)
    try:
        results["idle_health_s"] = idle_health(url)
        results["burst_fake"] = burst(url, args.requests, "slow")
        for model in ("hrnet", "cbam_resunet"):
            results[f"burst_{model}_small"] = burst(url, args.requests, model, args.image_size)
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
    bursts = {name[6:]: b for name, b in results.items() if name.startswith("burst_")}
    checks = {"every request answered": all(b["answered"] == b["requests"] for b in bursts.values()),
              "no 500 in the bursts": all(500 not in b["status_counts"] for b in bursts.values()),
              "timeout answered 504": results["timeout"]["status"] == 504}
    for name, b in bursts.items():
        checks[f"/health p99 {(b['health_latency_s']['p99'] or 0) * 1000:.0f} ms < 100 ms ({name})"] = (
            (b["health_latency_s"]["p99"] or 0) < 0.1)
    load = os.getloadavg()[0]
    print(f"\n== targets ({args.executor} workers; machine: {os.cpu_count()} CPUs, load average {load:.1f}; "
          "client and server share them) ==")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "checks": checks}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
