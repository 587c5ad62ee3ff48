"""`make demo`, serving part: ask the same chat of several refs at once over gRPC, then show their /metrics lines.

Usage: python scripts/demo_query.py HOST:PORT METRICS_URL SYSTEM USER REF [REF ...]   (REF "-": the base model)
"""

from __future__ import annotations

import sys
import threading
import urllib.request

from hotswap.client import Client, Generation


def main(target: str, metrics_url: str, system: str, user: str, refs: list[str]) -> None:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    results: dict[str, Generation] = {}
    start = threading.Barrier(len(refs))

    def ask(ref: str) -> None:
        with Client(target, timeout=60) as client:
            start.wait()  # both requests arrive together and share the running batch
            adapters = [] if ref == "-" else [ref]
            results[ref] = client.generate(messages=messages, adapters=adapters, max_new_tokens=48)

    threads = [threading.Thread(target=ask, args=(ref,)) for ref in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ref in refs:
        r = results[ref]
        resolved = ", ".join(f"{a}" for a, _ in r.adapters) or "base"
        print(f"{ref:>14} -> {resolved}: {user!r}\n{'':>18}{r.text!r} ({r.finish_reason})")
        print(f"{'':>18}{r.completion_tokens} tokens, ttft {r.ttft_s * 1e3:.1f} ms, total {r.total_s * 1e3:.1f} ms")
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    print(f"\nper-adapter lines from {metrics_url}:")
    wanted = (
        "hotswap_requests_total{",
        "hotswap_time_to_first_token_seconds_sum",
        "hotswap_request_duration_seconds_sum",
        "hotswap_generated_tokens_total{",
    )
    for line in text.splitlines():
        if line.startswith(wanted):
            print("  " + line)
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("hotswap_batch_size_bucket")}  # fmt: skip
    print(f"  decode steps that ran 2+ rows in one batch: {buckets['+Inf'] - buckets['1.0']:.0f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
