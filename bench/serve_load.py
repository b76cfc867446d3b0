"""Server load benchmark: N concurrent streaming clients, some disconnecting mid-stream, for a fixed time.

Starts `pixtral-exl2 serve` in a child process (its RSS is read from /proc before and after: it should
stay flat), drives it with asyncio + httpx, and reports completed requests, errors, disconnects,
completion tokens/s and p50/p95 time to first token. With `--compare-serial` the same load runs a
second time with one generation at a time, and the batched/serial throughput ratio is printed (the
point of the exllamav2 backend's batching; the reference backend runs one generation either way).

    python bench/serve_load.py [--model DIR] [--clients 8] [--seconds 30] [--backend reference] [--compare-serial]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_client(
    http: httpx.AsyncClient, deadline: float, rng: random.Random, max_tokens: int, stats: dict
) -> None:
    while time.monotonic() < deadline:
        leave_after = rng.randint(1, 6) if rng.random() < 0.25 else None  # a quarter of the clients walk away
        body = {
            "messages": [{"role": "user", "content": f"Tell me a story number {rng.randint(0, 10**6)}."}],
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0.8,
        }
        started, chunks, first = time.monotonic(), 0, None
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    stats["errors"] += 1
                    continue
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content":"' in line:
                        chunks += 1
                        first = first or time.monotonic()
                        if leave_after is not None and chunks >= leave_after:
                            break
                    if line.startswith("data: {") and '"error"' in line:
                        stats["errors"] += 1
        except httpx.HTTPError:
            stats["errors"] += 1
            continue
        if first is not None:
            stats["ttft"].append(first - started)
        stats["tokens"] += chunks
        stats["disconnected" if leave_after is not None and chunks >= leave_after else "completed"] += 1


async def drive(url: str, clients: int, seconds: float, max_tokens: int, seed: int) -> dict:
    stats = {"completed": 0, "disconnected": 0, "errors": 0, "tokens": 0, "ttft": []}
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(
            *(one_client(http, deadline, random.Random(seed + i), max_tokens, stats) for i in range(clients))
        )
    elapsed = time.monotonic() - started
    ttft = sorted(stats.pop("ttft")) or [float("nan")]
    return stats | {
        "seconds": elapsed,
        "tokens_per_s": stats["tokens"] / elapsed,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }


def serve(model: Path, port: int, backend: str, concurrent: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--disable-auth",
        "--backend",
        backend,
        "--max-concurrent",
        str(concurrent),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("model_loaded"):
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not come up")


def run_once(model: Path, args: argparse.Namespace, concurrent: int) -> dict:
    port = 5600 + random.Random().randint(0, 300)
    process = serve(model, port, args.backend, concurrent)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(drive(url, 1, 2.0, 4, 0))  # warm up: first request allocations
        before = rss_mb(process.pid)
        result = asyncio.run(drive(url, args.clients, args.seconds, args.max_tokens, 1))
        time.sleep(1.0)
        after = rss_mb(process.pid)
        healthy = httpx.get(f"{url}/health", timeout=5).json()["status"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    return result | {
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_ratio": after / before,
        "health_after": healthy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model to serve (default: the demo model, written to a temp dir)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--compare-serial", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from runtime.demo.model import write_demo_model

            model = write_demo_model(Path(tmp) / "demo")
        results = {"batched": run_once(model, args, args.clients)}
        if args.compare_serial:
            results["serial"] = run_once(model, args, 1)
            results["batched_over_serial_tokens_per_s"] = (
                results["batched"]["tokens_per_s"] / results["serial"]["tokens_per_s"]
            )
    print(
        f"serve load: {args.clients} streaming clients, {args.seconds:g} s, {args.max_tokens} tokens max, backend "
        f"{args.backend}"
    )
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
