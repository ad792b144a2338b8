"""The viewer under load: `modelrecon serve` (a separate process, as users run it) over a 10,026-node, 115k-edge graph
(the synthetic graph of tests/test_viewer_load.py, 11 MB of JSON), with N = 1, 4 and 16 parallel clients.

Three workloads, each for `--seconds` per N: `graph` (GET /api/graph: the whole graph, what opening the view costs),
`node` (GET /api/feature: one node's panel, what a click costs) and `save` (POST /api/annotations: a pin and a label).
Clients are threads with one keep-alive connection each; they read every byte but parse nothing. The graph is opened
once first (timed: that open imports the graph code, validates the file and caches it). Prints requests/s and p50/p95
latency per workload and N, and the server's resident memory (VmRSS) idle, after the first open and after the last
request, and its peak (VmHWM). Client and server share the machine's cores.

    .venv/bin/python benchmarks/viewer_load.py [--seconds 5] [--clients 1 4 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from modelrecon.circuits.graph_file import graph_to_json, save_graph  # noqa: E402
from test_viewer_load import synthetic_graph  # noqa: E402

GRAPH = "big/graph.json"


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "modelrecon.cli", "serve", str(folder), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()  # "serving ... at http://localhost:PORT/"
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"{url}/api/index", timeout=2).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server did not answer: {process.stderr.read()[-2000:]}")


def run(url: str, n_clients: int, seconds: float, request) -> dict:
    """`n_clients` threads calling `request(http, client, k)` until `seconds` pass; latencies of the 2xx answers."""
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    failures = [0] * n_clients
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            k = 0
            while time.perf_counter() < stop:
                began = time.perf_counter()
                response = request(http, c, k)
                if response.is_success:
                    latencies[c].append(time.perf_counter() - began)
                else:
                    failures[c] += 1
                k += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    every = sorted(x for per in latencies for x in per)
    return {
        "clients": n_clients,
        "requests": len(every),
        "failures": sum(failures),
        "requests_per_s": round(len(every) / wall, 1),
        "p50_ms": round(1000 * statistics.median(every), 1),
        "p95_ms": round(1000 * every[min(len(every) - 1, int(0.95 * len(every)))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per workload and client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "results"
        (folder / "big").mkdir(parents=True)
        graph = synthetic_graph()
        save_graph(graph, folder / GRAPH)
        features = [
            n["node_id"] for n in graph_to_json(graph)["nodes"] if n["feature_type"] == "cross layer transcoder"
        ]
        size_mb = (folder / GRAPH).stat().st_size / 1e6
        process, url = start_server(folder)
        try:
            before = memory_mib(process.pid)
            began = time.perf_counter()  # the first open: imports the graph code (torch), validates and caches
            httpx.get(f"{url}/api/graph/{GRAPH}", timeout=120).raise_for_status()
            cold_s, opened = time.perf_counter() - began, memory_mib(process.pid)
            workloads = {
                "graph": lambda http, c, k: http.get(f"/api/graph/{GRAPH}"),
                "node": lambda http, c, k: http.get(
                    f"/api/feature/{GRAPH}", params={"node": features[(97 * c + k) % len(features)]}
                ),
                "save": lambda http, c, k: http.post(
                    f"/api/annotations/{GRAPH}",
                    json={"pinned": [features[c]], "labels": {features[c]: f"client {c}, save {k}"}},
                ),
            }
            results = {name: [run(url, n, args.seconds, request) for n in args.clients] for name, request in
                        workloads.items()}  # fmt: skip
            after = memory_mib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=10)
    memory = {"idle": before["VmRSS"], "after_first_open": opened["VmRSS"], "after_load": after["VmRSS"],
              "peak": after["VmHWM"]}  # fmt: skip
    report = {
        "graph": {"nodes": graph.n_nodes, "edges": int(graph.weights.numel()), "json_mb": round(size_mb, 1)},
        "first_open_s": round(cold_s, 2),
        "server_rss_mib": {key: round(value, 1) for key, value in memory.items()},
        "workloads": results,
    }
    print(
        f"graph: {graph.n_nodes} nodes, {graph.weights.numel()} edges, {size_mb:.1f} MB of JSON; first open "
        f"{cold_s:.2f} s"
    )
    print(f"{'workload':<8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'failed':>7}")
    for name, rows in results.items():
        for row in rows:
            print(f"{name:<8} {row['clients']:>7} {row['requests_per_s']:>8} {row['p50_ms']:>8} {row['p95_ms']:>8} "
                  f"{row['failures']:>7}")  # fmt: skip
    print("server resident memory (MiB): " + ", ".join(f"{k} {v}" for k, v in report["server_rss_mib"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
