"""Redis memory per cached entry, for sizing the result cache (deploy/README.md).

Run: .venv/bin/python bench/redis_memory.py [--entries 1000000]
Starts a throwaway redis-server on a free loopback port (as the tests do), writes `--entries`
cache entries through the service's own `ResultCache.put_many` (the worker's write path: keys
`qscore:<model version>:<digest hex>`, float32 values, SET EX with the default TTL), then reads
`INFO memory`. Two kinds of entry, each in an empty server:

- a query alone (similarity head): its 384-float embedding, 1,536 bytes;
- a (query, doc) pair (similarity head): its cosine, 4 bytes (a classifier's probability is
  the same size).

An item with k docs writes one query entry and k pair entries. Prints a markdown table and one
JSON line; writes nothing into docs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, markdown_table

VERSION = "e691fe4dd773"  # a real model_version's length (12 hex characters)
KINDS = {"query embedding (384 x float32)": 384, "(query, doc) score (1 x float32)": 1}


async def fill(url: str, entries: int, width: int, batch: int) -> dict[str, int]:
    """Write `entries` values of `width` floats; return INFO memory figures before/after."""
    from redis.asyncio import Redis

    from plumbing.cache import CacheSettings, ResultCache, query_digests

    admin = Redis.from_url(url)
    await admin.flushall()
    before = await admin.info("memory")
    settings = CacheSettings(redis_url=url, local_entries=0, op_timeout_s=30.0)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((batch, width)).astype("<f4")
    async with ResultCache(settings, VERSION) as cache:
        for start in range(0, entries, batch):
            n = min(batch, entries - start)
            # Unique keys as the tokenizer makes them: one digest per (version, query, doc).
            digests = [query_digests(VERSION, f"query number {start + i}", ())[0]
                       for i in range(n)]
            await cache.put_many([(d, values[i].tobytes()) for i, d in enumerate(digests)])
        if cache.stats.errors:
            raise RuntimeError(f"{cache.stats.errors} Redis writes failed")
    keys = await admin.dbsize()
    after = await admin.info("memory")
    await admin.aclose()
    return {"keys": keys, "used_before": before["used_memory"],
            "used_after": after["used_memory"], "rss_after": after["used_memory_rss"],
            "value_bytes": width * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500, help="entries per put_many call")
    args = parser.parse_args()

    import subprocess

    from qscore.local.servers import RedisServer

    rows, out = [], {}
    with RedisServer() as server:
        version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                 text=True, check=True).stdout.split()[2]
        for kind, width in KINDS.items():
            r = asyncio.run(fill(server.url, args.entries, width, args.batch))
            if r["keys"] != args.entries:
                raise SystemExit(f"{kind}: {r['keys']} keys in Redis, expected {args.entries}")
            per_entry = (r["used_after"] - r["used_before"]) / args.entries
            out[kind] = {"bytes_per_entry": round(per_entry, 1), **r}
            rows.append([kind, f"{args.entries:,}", f"{r['value_bytes']:,}",
                         f"{per_entry:,.0f}", f"{per_entry * 1e6 / 2**20:,.0f}",
                         f"{r['rss_after'] / 2**20:,.0f}"])
    print(f"Machine: {machine()}; redis-server {version.removeprefix('v=')}; "
          f"{args.entries:,} entries per kind, written by ResultCache.put_many "
          f"({args.batch} a call), TTL on every key.\n")
    print(markdown_table(["entry", "entries", "value bytes", "used_memory bytes/entry",
                          "MiB per million entries", "RSS after, MiB"], rows))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
