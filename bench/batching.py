"""Queue-depth batching under load: offered load from ~10% to ~120% of the engine's capacity,
through the real broker, against the bare engine measured in the same run.

Run: .venv/bin/python bench/batching.py [--step-seconds 6] [--items-per-message 4]
The scoring worker runs as its own process (`qscore worker`), the embedded broker beside it;
this process plays the tokenizer service (it publishes pre-tokenized real queries, as a CPU
tokenizer tier would) and the score consumer. Latency is end to end: publish of a TokenBatch
-> ScoreBatch received. Mean batch size comes from the worker's Prometheus counters.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, percentiles, write_section
from bench.host_cost import cpu_seconds, loop_thread_seconds


def bare_engine(path: Path, queries: list[str], max_batch: int,
                per_message: int) -> tuple[float, float, float]:
    """Engine alone on the same real queries: items/s at full batches (the ceiling), the
    time of one call the size of one message (the low-load latency floor), and the cores it
    kept busy (CPU seconds per second) reaching that ceiling."""
    from engines.loader import load_engine
    from engines.tokenizer import QueryTokenizer
    from schemas import QueryItem
    from workers.scoring import BatchLimits, run_token_batch

    engine = load_engine(path)
    tok = QueryTokenizer(path / "tokenizer" / "tokenizer.json", engine.manifest.max_length,
                         pairs=False)
    items = [QueryItem(id=str(i), query=q) for i, q in enumerate(queries)]
    limits = BatchLimits(max_batch=max_batch)
    window = 512  # what a worker's queue holds at saturation, not the whole set sorted
    # One untimed pass: OpenVINO compiles kernels the first time it sees a batch shape.
    for i in range(0, len(items), window):
        run_token_batch(engine, tok.token_batch("w", items[i:i + window], submitted_at=0),
                        limits)
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(items), window):
        run_token_batch(engine, tok.token_batch("b", items[i:i + window], submitted_at=0),
                        limits)
    seconds = time.perf_counter() - started
    capacity = len(items) / seconds
    cores = (time.process_time() - cpu) / seconds
    small = [run_token_batch(engine, tok.token_batch("s", items[i:i + per_message],
                                                     submitted_at=0), limits).batch_ms[0]
             for i in range(0, 100 * per_message, per_message)]
    engine.close()
    return capacity, float(np.median(small)), cores


async def broker_hop_ms(bootstrap: str, topic: str, n: int = 50) -> float:
    """Median publish -> fetched time of one small message: what each Kafka hop costs here,
    with the same client settings the fleet uses on the embedded broker."""
    from aiokafka import AIOKafkaConsumer

    from plumbing.kafka import KafkaSettings, make_producer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=2)
    await consumer.start()
    await consumer.seek_to_end()
    for tp in consumer.assignment():
        await consumer.position(tp)
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap))
    await producer.start()
    times = []
    try:
        for i in range(n):
            started = time.perf_counter()
            await producer.send_and_wait(topic, b"x", key=str(i).encode())
            while not await consumer.getmany(timeout_ms=1000):
                pass
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await producer.stop()
        await consumer.stop()
    return float(np.median(times))


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^(qscore_\w+?)(?:_total)? ([0-9.e+-]+)$", text, re.M)}


async def run_step(bootstrap: str, topics, messages, rate_items: float,  # type: ignore[no-untyped-def]
                   per_message: int, seconds: float) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer

    from plumbing.kafka import KafkaSettings, make_producer
    from schemas import encode_token_batch

    n_messages = max(1, int(rate_items * seconds / per_message))
    interval = per_message / rate_items
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    consumer = AIOKafkaConsumer(topics.scores, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=2)
    await consumer.start()
    await consumer.seek_to_end()
    for tp in consumer.assignment():
        await consumer.position(tp)  # pin "latest" before anything is sent
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap), linger_ms=0)
    await producer.start()
    last_recv = 0.0

    async def receive() -> None:
        nonlocal last_recv
        while len(latencies) < n_messages:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for r in records:
                    # Only the id: full validation is the consumer's cost, not the fleet's.
                    batch_id = orjson.loads(r.value)["batch_id"]
                    if batch_id in sent:
                        latencies.append((now - sent.pop(batch_id)) * 1000)
                        last_recv = now
        done.set()

    receiver = asyncio.create_task(receive())
    start = time.perf_counter()
    for i in range(n_messages):
        due = start + i * interval
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tb = messages[i % len(messages)]
        batch_id = f"{tb.batch_id}-{uuid.uuid4().hex[:8]}"
        payload = encode_token_batch(replace(tb, batch_id=batch_id, submitted_at=time.time()))
        sent[batch_id] = time.perf_counter()
        await producer.send(topics.tokens, payload, key=batch_id.encode())
    await producer.flush()
    try:
        await asyncio.wait_for(done.wait(), timeout=seconds * 4 + 30)
    finally:
        receiver.cancel()
        await producer.stop()
        await consumer.stop()
    p50, p99 = percentiles(latencies)
    return {"offered": rate_items, "throughput": n_messages * per_message / (last_recv - start),
            "p50": p50, "p99": p99, "lost": len(sent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=None)
    parser.add_argument("--loads", default="0.1,0.3,0.5,0.7,0.9,1.0,1.2",
                        help="offered load as fractions of the bare engine's capacity")
    parser.add_argument("--step-seconds", type=float, default=6.0)
    parser.add_argument("--items-per-message", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--engines", type=int, default=1, help="worker engine instances")
    parser.add_argument("--threads", type=int, default=None, help="threads per instance")
    parser.add_argument("--worker-args", default="", help="extra `qscore worker` flags")
    parser.add_argument("--engine", type=Path, default=None,
                        help="artifact to serve (default: the model's promoted version)")
    parser.add_argument("--section", default="batching",
                        help="docs/benchmarks.md section to write (bench:NAME markers)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from engines.manifest import read_manifest
    from engines.select import EngineSettings, find_artifact
    from engines.source import resolve_model
    from engines.tokenizer import QueryTokenizer
    from plumbing.kafka import KafkaSettings, Topics, ensure_topics
    from qscore.cli.options import DEFAULT_ENGINE_DIR
    from qscore.local.fleet import ServiceProcess
    from qscore.local.servers import EmbeddedBroker, free_port
    from schemas import QueryItem

    queries, source_name = load_queries(args.queries)
    path = args.engine or find_artifact(EngineSettings(engine_dir=DEFAULT_ENGINE_DIR))
    source = resolve_model("default")
    capacity, small_call_ms, bare_cores = bare_engine(path, queries[:2000], args.max_batch,
                                                      args.items_per_message)
    print(f"bare engine: {capacity:,.0f} items/s at batch {args.max_batch} on {bare_cores:.2f} "
          f"cores; one {args.items_per_message}-query call {small_call_ms:.1f} ms")

    tok = QueryTokenizer(path / "tokenizer" / "tokenizer.json", source.max_length, pairs=False)
    k = args.items_per_message
    messages = [tok.token_batch(f"m{i}", [QueryItem(id=str(j), query=q) for j, q in
                                          enumerate(queries[i:i + k])], submitted_at=0.0)
                for i in range(0, min(len(queries), 4000) - k, k)]
    rows = []
    with EmbeddedBroker() as broker:
        topics = Topics.with_prefix(f"bench-{uuid.uuid4().hex[:6]}")
        asyncio.run(ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
                                  topics.all(), partitions=4))
        hop_ms = asyncio.run(broker_hop_ms(broker.bootstrap_servers, topics.dead_letter))
        print(f"one broker hop (publish -> fetched): {hop_ms:.1f} ms")
        port = free_port()
        log = Path("/tmp") / f"qscore-bench-worker-{port}.log"
        worker = ServiceProcess("worker", [
            "worker", "--engine", str(path), "--bootstrap-servers", broker.bootstrap_servers,
            "--topic-prefix", topics.scores.rsplit(".", 1)[0], "--fast-groups",
            "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
            "--metrics-port", str(port), "--log-level", "warning", "--engines", str(args.engines),
            *(["--threads", str(args.threads)] if args.threads else []),
            *args.worker_args.split()], log_path=log).start()
        try:
            _wait_for_metrics(port, worker)
            # Warm-up: the group join, and the engine's first calls.
            asyncio.run(run_step(broker.bootstrap_servers, topics, messages, capacity * 0.2, k,
                                 2.0))
            pids = {"worker": worker.pid, "broker": broker.pid}
            for load in (float(x) for x in args.loads.split(",")):
                before = scrape(port)
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                loop0, wall0 = loop_thread_seconds(worker.pid), time.perf_counter()
                own0 = time.process_time()  # this process alone (the others are its children)
                result = asyncio.run(run_step(broker.bootstrap_servers, topics, messages,
                                              capacity * load, k, args.step_seconds))
                wall = time.perf_counter() - wall0
                cores = {name: (cpu_seconds(pid) - cpu0[name]) / wall
                         for name, pid in pids.items()}
                loop = (loop_thread_seconds(worker.pid) - loop0) / wall
                result["engine_cores"] = cores["worker"] - loop  # lanes, ONNX Runtime threads
                result["loop_cores"] = loop
                result["broker_cores"] = cores["broker"]
                result["bench_cores"] = (time.process_time() - own0) / wall
                after = scrape(port)
                batches = after["qscore_worker_worker_batches"] - before[
                    "qscore_worker_worker_batches"]
                seqs = after["qscore_worker_worker_sequences"] - before[
                    "qscore_worker_worker_sequences"]
                result["mean_batch"] = seqs / batches if batches else 0.0
                print(f"load {load:>4.0%}: {result}")
                rows.append((load, result))
        finally:
            worker.stop()

    per_core = capacity / bare_cores
    manifest = read_manifest(path)
    engine_desc = (f"{manifest.backend} {manifest.precision}, {args.engines} engine "
                   f"instance(s) x {args.threads or 'all cores / instances'} threads"
                   + (f", `{args.worker_args}`" if args.worker_args else ""))
    table = markdown_table(
        ["offered load", "offered items/s", "mean batch", "p50 ms", "p99 ms",
         "delivered items/s", "vs bare engine", "lost", "cores: engine threads / worker loop "
         "/ broker / bench", "delivered per engine core vs bare"],
        [[f"{load:.0%}", f"{r['offered']:,.0f}", f"{r['mean_batch']:.1f}", f"{r['p50']:.1f}",
          f"{r['p99']:.1f}", f"{r['throughput']:,.0f}", f"{r['throughput'] / capacity:.0%}",
          str(r["lost"]), f"{r['engine_cores']:.2f} / {r['loop_cores']:.2f} / "
          f"{r['broker_cores']:.2f} / {r['bench_cores']:.2f}",
          f"{r['throughput'] / max(r['engine_cores'], 1e-9) / per_core:.0%}"]
         for load, r in rows])
    body = (
        "## Batching under load (`bench/batching.py`"
        + (")" if args.section == "batching" else f", {manifest.backend} {manifest.precision})")
        + "\n\n"
        f"Machine: {machine()}. One scoring worker process ({engine_desc}, all-MiniLM-L6-v2, "
        f"max batch {args.max_batch}, max wait {args.max_wait_ms} ms) beside the embedded broker "
        f"(tansu); the bench process publishes pre-tokenized real queries ({source_name}) as "
        f"TokenBatches of {k} queries at a fixed rate for {args.step_seconds:.0f} s per step and "
        "reads the scores back. Latency: publish -> ScoreBatch received. All on the same 2 "
        "cores, so broker and bench compete with the engine.\n\n"
        f"Bare engine in the same run: **{capacity:,.0f} items/s** (batch {args.max_batch}, "
        f"length-sorted windows of 512) on {bare_cores:.2f} cores, {per_core:,.0f} items/s "
        f"per core; one {k}-query call: {small_call_ms:.1f} ms; one "
        f"broker hop (publish -> fetched, a {hop_ms:.1f} ms median) is paid twice per request "
        "(tokens in, scores out). Cores are CPU seconds per second of each step from "
        "/proc: the worker's event-loop thread apart from its other threads (engine lanes, "
        "ONNX Runtime), the broker, and this bench process (publisher and reader); *delivered "
        "per engine core vs bare* compares the worker's items per engine-thread core with the "
        "bare engine's items per core.\n\n"
        f"{table}\n\n"
        f"Command: `.venv/bin/python bench/batching.py --step-seconds {args.step_seconds:g} "
        f"--items-per-message {k}"
        + (f" --engines {args.engines}" if args.engines != 1 else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --worker-args='{args.worker_args}'" if args.worker_args else "")
        + (f" --engine <{manifest.backend} {manifest.precision} artifact>" if args.engine
           else "")
        + (f" --section {args.section}" if args.section != "batching" else "") + "`\n")
    print(body)
    if not args.no_write:
        write_section(args.section, body)


def _wait_for_metrics(port: int, proc) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{proc.log_tail()}")
        try:  # the port opens before the engine loads: ready is what counts
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read()
            return
        except OSError:  # refused, or 503 (HTTPError) while starting
            time.sleep(0.2)
    raise RuntimeError("worker never became ready")


if __name__ == "__main__":
    main()
