"""Host CPU per item: the local fleet on a near-free engine, CPU time per process from /proc.

Run: .venv/bin/python bench/host_cost.py [--short] [--items 20000] [--per-batch 20]
                                         [--redis | --docs 4 | --backlog] [--engine DIR]
                                         [--no-write]
                                         [--profile DIR]
The engine is a 1-layer, 32-wide random BERT with the default model's tokenizer, built FP32
with ONNX Runtime, so what is left is the fleet's own cost. The fleet is the one `qscore up`
starts (embedded broker, 1 tokenizer service, 1 scoring worker, separate processes). N real
queries, made unique so that no cache hides work, are published in batches of B through a
plain Kafka client and read back by a plain consumer without a group; CPU time (utime + stime)
of each process and its descendants is read from /proc/PID/stat around the timed stream.
Without --redis, --docs or --backlog, four runs: Redis off; Redis off with the worker draining a
backlog of TokenBatches published by this process (the worker alone at saturation, as feeding a
GPU needs; otherwise it takes records one by one at the pace of the tokenizer on the same two
cores); Redis off with docs per item; Redis on.
With --profile DIR, py-spy samples the worker and the tokenizer service (with its pool
processes) during each timed stream; DIR gets their collapsed stacks and a summary is printed
(the functions with the most samples, self and inclusive).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, write_section

CACHE = Path(tempfile.gettempdir()) / "qscore-bench-host-cost"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Config:
    redis: bool
    docs: int  # docs per item; 0: query-only items
    # The worker alone at saturation: TokenBatches made here are published to the token topic
    # before the timer starts, so the worker drains a backlog (as it must to feed a GPU)
    # instead of taking records one by one at the pace of the tokenizer on the same cores.
    backlog: bool = False

    @property
    def name(self) -> str:
        return (f"Redis {'on' if self.redis else 'off'}, "
                + (f"{self.docs} docs per item" if self.docs else "query only")
                + (", worker draining a backlog" if self.backlog else ""))


# -- the near-free engine ------------------------------------------------------------------

def tiny_model(root: Path) -> Path:
    """A random 1-layer, 32-wide BERT with the default model's tokenizer (made once)."""
    model_dir = root / "tiny-bert-l1-h32"
    if (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file():
        return model_dir
    import torch
    from transformers import BertConfig, BertModel

    from engines.source import TOKENIZER_FILES, default_model_path

    src = default_model_path()
    base = orjson.loads((src / "config.json").read_bytes())
    torch.manual_seed(0)  # the same weights each time: the same engine version
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, vocab_size=base["vocab_size"],
                        max_position_embeddings=base["max_position_embeddings"])
    tmp = root / f".tmp-{uuid.uuid4().hex[:6]}"
    BertModel(config).eval().save_pretrained(tmp)
    for name in (*TOKENIZER_FILES, "sentence_bert_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    tmp.rename(model_dir)
    return model_dir


def tiny_engine(root: Path) -> Path:
    """Build (or find) the FP32 ONNX Runtime engine of tiny_model() in a bench-owned dir."""
    from engines.build import ensure_engine
    from engines.source import resolve_model

    root.mkdir(parents=True, exist_ok=True)
    source = resolve_model(tiny_model(root))
    return ensure_engine(source, root / "engines", precision="fp32")


def engine_alone_us(artifact: Path, queries: list[str], per_batch: int, docs: int,
                    n: int = 4000) -> float:
    """CPU us per item of the engine alone, in this process, as the worker runs it (all cores
    as threads, no spinning) on the same kind of items in batches of `per_batch`: what the
    worker's figure includes but is not its own host cost."""
    from engines.batch import pad_gather, plan_batches
    from engines.manifest import read_manifest
    from engines.select import load_engine
    from engines.tokenizer import QueryTokenizer
    from workers.microbatcher import BatcherSettings

    manifest = read_manifest(artifact)
    engine = load_engine(artifact, threads=os.cpu_count() or 1, spin=False)
    tokenizer = QueryTokenizer(artifact / "tokenizer" / "tokenizer.json", manifest.max_length,
                               pairs=manifest.head == "classifier")
    batches = make_batches(queries, n, per_batch, docs, "e")
    tbs = [tokenizer.token_batch(b, items, submitted_at=0.0)  # type: ignore[arg-type]
           for b, items in batches.items()]
    limits = BatcherSettings()
    calls = [pad_gather([(tb.input_ids, tb.token_type_ids, tb.offsets[rows], tb.lengths[rows])])
             for tb in tbs for rows in plan_batches(tb.lengths, max_batch=limits.max_batch,
                                                    token_budget=limits.token_budget)]
    for batch in calls[:20]:  # warm-up
        engine.run(batch)
    started = time.process_time()
    for batch in calls:
        engine.run(batch)
    return (time.process_time() - started) / n * 1e6


# -- CPU time from /proc -------------------------------------------------------------------

def _stat(pid: int, stat: str = "stat") -> tuple[int, float] | None:
    """(ppid, utime + stime in seconds) of a live process (or, with stat="task/TID/stat",
    one of its threads), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/{stat}").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and every live descendant (the tokenizer's pool processes)."""
    parents: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents.setdefault(st[0], []).append(int(entry.name))
            times[int(entry.name)] = st[1]
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo += parents.get(p, [])
    return total


# -- profiles ------------------------------------------------------------------------------

def start_profiles(procs: dict[str, int], out: Path, tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on each process (and its children), collapsed stacks to out/<name>-<tag>.txt."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "200",
                              "--format", "raw", "--nonblocking",
                              "-o", str(out / f"{name.split()[0]}-{tag}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in procs.items()]


def stop_profiles(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in spies:
        spy.wait(timeout=60)


def summarize_profile(path: Path, top: int = 25) -> str:
    """The functions with the most samples in a py-spy raw file: self and inclusive."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        # "func (path/file.py:line)" -> "func (file.py)": lines would split a function.
        frames = [f"{f.split(' (')[0]} ({f.rsplit('/', 1)[-1].split(':')[0]})" if " (" in f
                  else f for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [f"{path.name}: {total} samples"]
    for title, table in (("self", own), ("inclusive", incl)):
        lines.append(f"  top {title}:")
        for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * n / max(total, 1):5.1f}%  {name}")
    return "\n".join(lines)


def loop_thread_seconds(pid: int) -> float:
    """CPU time of a process's main thread: a service's event loop, where its Python runs
    (engine lanes, ONNX Runtime and tokenizer threads are the others)."""
    st = _stat(pid, f"task/{pid}/stat")
    return st[1] if st is not None else 0.0


# -- one fleet, one or more timed streams --------------------------------------------------

def make_batches(queries: list[str], n: int, per_batch: int, docs: int,
                 tag: str) -> dict[str, list[object]]:
    """`n` items of unique queries (a run tag and a counter appended), `docs` docs each."""
    from schemas import QueryItem

    def item(i: int) -> QueryItem:
        q = queries[i % len(queries)]
        return QueryItem(id=str(i % per_batch), query=f"{q} {tag}{i}",
                         docs=tuple(f"{queries[(i * 7 + k + 1) % len(queries)]} {tag}{i}"
                                    for k in range(docs)) or None)

    return {f"{tag}-{b:06d}": [item(i) for i in range(b, min(b + per_batch, n))]
            for b in range(0, n, per_batch)}


def token_records(artifact: Path, batches: dict[str, list[object]]) -> list[bytes]:
    """The TokenBatches the tokenizer service would publish for `batches` (cache keys too)."""
    from engines.manifest import read_manifest
    from engines.tokenizer import QueryTokenizer
    from plumbing.cache import key_digest
    from schemas import encode_token_batch

    manifest = read_manifest(artifact)
    tokenizer = QueryTokenizer(artifact / "tokenizer" / "tokenizer.json", manifest.max_length,
                               pairs=manifest.head == "classifier")
    out = []
    for b, items in batches.items():
        tb = tokenizer.token_batch(b, items, submitted_at=time.time())  # type: ignore[arg-type]
        keys = [key_digest(manifest.version, items[i].query,  # type: ignore[attr-defined]
                           None if d < 0 else items[i].docs[d])  # type: ignore[attr-defined]
                for i, d in zip(tb.seq_item.tolist(), tb.seq_doc.tolist(), strict=True)]
        keyed = replace(tb, cache_keys=np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16))
        out.append(encode_token_batch(keyed))
    return out


async def stream(bootstrap: str, topic_prefix: str, partitions: int,
                 batches: dict[str, list[object]], tokens: list[bytes] | None = None) -> float:
    """Publish every batch (or its TokenBatch, to the token topic) and read every item back;
    seconds from first send to last item."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from plumbing.kafka import KafkaSettings, Topics
    from qscore.client import QueryProducer

    topics = Topics.with_prefix(topic_prefix)
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    want = {b: len(items) for b, items in batches.items()}
    seen: dict[str, set[str]] = {b: set() for b in batches}
    left = sum(want.values())
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=20)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topics.scores, p) for p in range(partitions)])
        for tp in consumer.assignment():  # positions (latest) taken before anything is sent
            await consumer.position(tp)
        started = time.perf_counter()  # the worker may start on the backlog as it lands
        if tokens is not None:
            raw = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
            await raw.start()
            try:
                await asyncio.gather(*[await raw.send(topics.tokens, t, key=b.encode())
                                       for t, b in zip(tokens, batches, strict=True)])
            finally:
                await raw.stop()
        async with QueryProducer(kafka, topics) as producer:
            if tokens is None:
                sends = [await producer.send(items, batch_id=b)  # type: ignore[arg-type]
                         for b, items in batches.items()]
                await asyncio.gather(*sends)
            while left:
                records = await consumer.getmany(timeout_ms=1000)
                for recs in records.values():
                    for rec in recs:
                        batch = orjson.loads(rec.value)  # type: ignore[arg-type]
                        ids = seen.get(batch["batch_id"])
                        if ids is None:
                            continue
                        before = len(ids)
                        ids.update(it["id"] for it in batch["items"])
                        left -= len(ids) - before
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def run_fleet(artifact: Path, queries: list[str], configs: list[Config], items: int,
              per_batch: int, warmup: int, profile: Path | None = None,
              worker_args: tuple[str, ...] = ()) -> dict[Config, dict[str, float]]:
    from qscore.local.fleet import FleetSpec, LocalFleet

    prefix = f"hostcost-{uuid.uuid4().hex[:6]}"
    spec = FleetSpec(artifact=artifact, tokenizers=1, workers=1, use_redis=configs[0].redis,
                     topic_prefix=prefix, worker_args=worker_args)
    if configs[0].redis and not shutil.which("redis-server"):
        sys.exit("the Redis run needs redis-server on PATH (apt-get install redis-server)")
    results: dict[Config, dict[str, float]] = {}
    with LocalFleet(spec) as fleet:
        procs = {"scoring worker": fleet.workers[0].pid,
                 "tokenizer service (main + pool)": fleet.tokenizers[0].pid,
                 "tansu broker": fleet.broker.pid if fleet.broker else None}
        if fleet.redis is not None:
            procs["redis-server"] = fleet.redis.pid
        for cfg in configs:
            tag = uuid.uuid4().hex[:4]
            # Warm-up: group joins, first engine calls and imports stay out of the timing.
            asyncio.run(stream(fleet.bootstrap_servers, prefix, spec.partitions,
                               make_batches(queries, warmup, per_batch, cfg.docs, f"w{tag}")))
            batches = make_batches(queries, items, per_batch, cfg.docs, f"m{tag}")
            tokens = token_records(artifact, batches) if cfg.backlog else None
            spies = [] if profile is None else start_profiles(
                {n: p for n, p in procs.items() if p and not n.startswith(("tansu", "redis"))},
                profile, f"{'redis' if cfg.redis else 'noredis'}-{cfg.docs}docs")
            before = {name: cpu_seconds(pid) for name, pid in procs.items() if pid}
            loop_before = loop_thread_seconds(procs["scoring worker"])
            seconds = asyncio.run(stream(fleet.bootstrap_servers, prefix, spec.partitions,
                                         batches, tokens))
            after = {name: cpu_seconds(pid) for name, pid in procs.items() if pid}
            loop_us = (loop_thread_seconds(procs["scoring worker"]) - loop_before) / items * 1e6
            if spies:
                stop_profiles(spies)
            results[cfg] = {"items": items, "seconds": seconds, "items_per_s": items / seconds,
                            **{name: (after[name] - before[name]) / items * 1e6
                               for name in before},
                            "scoring worker, event loop thread": loop_us}
            print(cfg.name, {k: round(v, 1) for k, v in results[cfg].items()}, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=None,
                        help="engine artifact to use instead of building the near-free one")
    parser.add_argument("--queries", type=Path, default=None)
    parser.add_argument("--items", type=int, default=None,
                        help="items per timed run (default 20000; 2000 with --short)")
    parser.add_argument("--per-batch", type=int, default=20)
    parser.add_argument("--redis", action="store_true", help="only the Redis-on run")
    parser.add_argument("--backlog", action="store_true",
                        help="only the run with the worker draining a backlog")
    parser.add_argument("--docs", type=int, default=None,
                        help="only a Redis-off run with this many docs per item")
    parser.add_argument("--short", action="store_true", help="small runs (well under a minute)")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/")
    parser.add_argument("--worker-args", default="",
                        help="extra `qscore worker` flags, e.g. '--spin --threads 1'")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the worker and tokenizer into this dir (implies --no-write: "
                             "sampling costs CPU)")
    args = parser.parse_args()

    from plumbing.logs import configure_logging

    configure_logging("warning")
    items = args.items or (2000 if args.short else 20000)
    warmup = 200 if args.short else 1000
    if args.redis or args.docs is not None or args.backlog:
        configs = [Config(redis=args.redis, docs=args.docs or 0, backlog=args.backlog)]
    else:
        configs = [Config(False, 0), Config(False, 0, backlog=True), Config(False, 4),
                   Config(True, 0)]
    queries, source_name = load_queries(args.queries)
    artifact = args.engine or tiny_engine(CACHE)
    results: dict[Config, dict[str, float]] = {}
    for redis in (False, True):  # one fleet per cache setting
        if group := [c for c in configs if c.redis == redis]:
            results |= run_fleet(artifact, queries, group, items, args.per_batch, warmup,
                                 args.profile, tuple(args.worker_args.split()))
    if args.profile is not None:
        for path in sorted(args.profile.glob("*.txt")):
            print(summarize_profile(path))
        args.no_write = True

    alone = {docs: engine_alone_us(artifact, queries, args.per_batch, docs)
             for docs in sorted({cfg.docs for cfg in results})}
    for cfg, r in results.items():
        r["engine alone"] = alone[cfg.docs]
        r["scoring worker, own"] = r["scoring worker"] - alone[cfg.docs]
    names = ["scoring worker", "scoring worker, event loop thread", "engine alone",
             "scoring worker, own",
             "tokenizer service (main + pool)", "tansu broker", "redis-server"]
    names = [n for n in names if any(n in r for r in results.values())]
    rows = [[cfg.name, f"{r['items']:,.0f}", f"{r['items_per_s']:,.0f}",
             *(f"{r[n]:,.0f}" if n in r else "-" for n in names)]
            for cfg, r in results.items()]
    table = markdown_table(["run", "items", "items/s end to end",
                            *(f"{n}, CPU us/item" for n in names)], rows)
    print(table)
    command = " ".join(["bench/host_cost.py", *sys.argv[1:]]).replace(" --no-write", "")
    engine = (f"the engine at `{args.engine}`" if args.engine else
              "a near-free engine (a random 1-layer, 32-wide BERT with the default model's "
              "tokenizer, ONNX Runtime FP32), so what is measured is the fleet's host cost")
    body = (
        "## Host cost per item (`bench/host_cost.py`)\n\n"
        f"Machine: {machine()}. The local fleet as `qscore up --tokenizers 1 --workers 1` "
        "starts it (embedded tansu broker, one tokenizer service with its default pool, one "
        f"scoring worker; separate processes) on {engine}. Each run publishes "
        f"{items:,} items made unique from {source_name} in batches of {args.per_batch} "
        "through a plain Kafka producer (qscore.client.QueryProducer) and reads every score "
        "back with a plain consumer without a group, after a warm-up of "
        f"{warmup:,} items; items/s is from the first send to the last item read. CPU is "
        "utime + stime from /proc/PID/stat over the timed stream, each process with its "
        "descendants (the tokenizer's pool processes), divided by the items. The publishing "
        "and reading client shares the machine's cores with the fleet. *Engine alone* is the "
        "same engine in one process, as the worker runs it (all cores as threads, no "
        "spinning), on the same kind of items in batches of the same size; *own* is the "
        "worker's figure less that: its host cost. The *event loop thread* is the worker's "
        "main thread alone (Kafka client, decode, batching, assembly, encode, cache writes); "
        "engine calls and padding run on its other threads.\n\n"
        f"{table}\n\n"
        f"Command: `.venv/bin/python {command}`\n")
    print(body)
    if not args.no_write:
        write_section("host_cost", body)


if __name__ == "__main__":
    main()
