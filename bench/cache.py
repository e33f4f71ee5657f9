"""Result cache on a Zipf stream of real queries: hit rate, and throughput with vs without.

Run: .venv/bin/python bench/cache.py [--items 6000] [--zipf 1.1]
Streams of queries drawn from the 6,980 real MS MARCO dev queries with Zipf-distributed
popularity go through the whole fleet (tokenizer service -> broker -> scoring worker), once
with the result cache (redis-server) and once without. Each run first serves a warm-up stream
(a cache in production is warm), then a second, independent stream from the same distribution
is published as a backlog and timed until every score is read back.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, write_section


def zipf_stream(queries: list[str], n: int, s: float, seed: int = 7) -> list[str]:
    """`n` draws; which query is how popular is fixed, only the draws depend on `seed`."""
    order = np.random.default_rng(0).permutation(len(queries))
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(queries) + 1) ** s
    ranks = rng.choice(len(queries), size=n, p=weights / weights.sum())
    return [queries[order[r]] for r in ranks]


async def run_fleet(bootstrap: str, artifact: Path, warmup: list[str], stream: list[str],
                    per_batch: int, redis_url: str | None) -> dict[str, float]:
    from engines.loader import load_engine
    from plumbing.cache import CacheSettings
    from plumbing.kafka import KafkaSettings, Topics, ensure_topics
    from qscore.client import QueryProducer, ScoreConsumer
    from schemas import QueryItem
    from tokenizer_svc.service import TokenizerService, TokenizerServiceSettings
    from workers.service import ScoringWorker, WorkerSettings

    kafka = KafkaSettings(bootstrap_servers=bootstrap).with_fast_groups()
    topics = Topics.with_prefix(f"cache-bench-{uuid.uuid4().hex[:6]}")
    await ensure_topics(kafka, topics.all(), partitions=4)
    # Without Redis and with no in-process entries, nothing is ever found: the no-cache run.
    cache = (CacheSettings(redis_url=redis_url, key_prefix=topics.scores.replace(".", "-"))
             if redis_url else CacheSettings(local_entries=0))
    tokenizer = TokenizerService(TokenizerServiceSettings(
        kafka=kafka, topics=topics, cache=cache, artifact=artifact, processes=1,
        group_id=f"{topics.scores}-t"))
    engine = load_engine(artifact)
    worker = ScoringWorker(WorkerSettings(kafka=kafka, topics=topics, cache=cache,
                                          group_id=f"{topics.scores}-w"), [engine])
    await tokenizer.start()
    await worker.start()
    tasks = [asyncio.create_task(tokenizer.run()), asyncio.create_task(worker.run())]

    def batches_of(tag: str, queries: list[str]) -> dict[str, list[QueryItem]]:
        return {f"{tag}{i:05d}": [QueryItem(id=str(j), query=q) for j, q in
                                  enumerate(queries[i:i + per_batch])]
                for i in range(0, len(queries), per_batch)}

    async def serve(batches: dict[str, list[QueryItem]]):  # type: ignore[no-untyped-def]
        futures = [await producer.send(items, batch_id=b) for b, items in batches.items()]
        await asyncio.gather(*futures)
        return await consumer.collect({b: [it.id for it in items]
                                       for b, items in batches.items()}, timeout=900)

    try:
        async with (QueryProducer(kafka, topics) as producer,
                    ScoreConsumer(kafka, topics) as consumer):
            # Warm-up: group joins, first engine calls and (with the cache) a warm cache stay
            # out of the timing.
            await serve(batches_of("w", warmup))
            calls_before, sequences_before = worker.stats.batches, worker.stats.sequences
            started = time.perf_counter()
            scores = await serve(batches_of("m", stream))
            elapsed = time.perf_counter() - started
    finally:
        tokenizer.request_stop()
        worker.request_stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await tokenizer.stop()
        await worker.stop()
    items = sum(len(v) for v in scores.values())
    cached = sum(s.cached for v in scores.values() for s in v.values())
    return {"items": items, "seconds": elapsed, "items_per_s": items / elapsed,
            "hit_rate": cached / items, "engine_calls": worker.stats.batches - calls_before,
            "engine_sequences": worker.stats.sequences - sequences_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=None)
    parser.add_argument("--items", type=int, default=6000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--per-batch", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from engines.select import EngineSettings, find_artifact
    from plumbing.logs import configure_logging
    from qscore.cli.options import DEFAULT_ENGINE_DIR
    from qscore.local.servers import EmbeddedBroker, RedisServer

    if not shutil.which("redis-server"):
        sys.exit("bench/cache.py needs redis-server on PATH (apt-get install redis-server)")
    configure_logging("warning")
    queries, source_name = load_queries(args.queries)
    warmup = zipf_stream(queries, args.items, args.zipf, seed=1)
    stream = zipf_stream(queries, args.items, args.zipf, seed=2)
    distinct = len(set(stream))
    artifact = find_artifact(EngineSettings(engine_dir=DEFAULT_ENGINE_DIR))
    results = {}
    with EmbeddedBroker() as broker, RedisServer() as redis:
        for name, url in (("no cache", None), ("Redis result cache", redis.url)):
            results[name] = asyncio.run(run_fleet(broker.bootstrap_servers, artifact, warmup,
                                                  stream, args.per_batch, url))
            print(name, results[name])
    base = results["no cache"]["items_per_s"]
    rows = [[name, f"{r['items']:,}", f"{r['hit_rate']:.1%}", f"{r['engine_sequences']:,.0f}",
             f"{r['seconds']:.1f}", f"{r['items_per_s']:,.0f}", f"{r['items_per_s'] / base:.2f}x"]
            for name, r in results.items()]
    table = markdown_table(["run", "items", "served from cache", "sequences through the engine",
                            "seconds", "items/s end to end", "vs no cache"], rows)
    body = (
        "## Result cache on a Zipf stream (`bench/cache.py`)\n\n"
        f"Machine: {machine()}. {args.items:,} query-only items drawn from {source_name} "
        f"with Zipf popularity (s = {args.zipf}; {distinct:,} distinct queries in the stream), "
        f"published as batches of {args.per_batch} through the embedded broker to one tokenizer "
        "service (1 tokenizer process) and one scoring worker (ONNX Runtime FP32), all in one "
        "process beside the broker and redis-server. Each run first serves a warm-up stream of "
        f"{args.items:,} items (a production cache is warm), then a second, independent stream "
        "from the same distribution, published as a backlog and timed until every score is "
        "read back; a repeat inside it hits only once its first occurrence's score is written."
        "\n\n"
        f"{table}\n\n"
        f"Command: `.venv/bin/python bench/cache.py --items {args.items} --zipf {args.zipf}`\n")
    print(body)
    if not args.no_write:
        write_section("cache", body)


if __name__ == "__main__":
    main()
