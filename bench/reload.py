"""Hot reload under load: end-to-end latency per second before, during and after a promotion.

Run: .venv/bin/python bench/reload.py [--seconds 40] [--promote-at 12] [--no-write]
The local fleet (embedded broker, redis-server if installed, 1 tokenizer, 2 scoring workers)
serves version A of the default model (FP32) from a bench-owned engine registry; a steady
stream of real queries (QueryBatches of 4, unique) is published at a fixed share of the
fleet's measured capacity and read back by a plain consumer. At `--promote-at` seconds version
B (INT8 level 2) is promoted. Three scenarios:
  (a) the reload controller at 30% load (the defaults, with short waits for a bench);
  (b) a forced immediate reload at 90% load (quiet load 1.0, deadline 1 s);
  (c) what users do without it: restart one worker onto B, then the other, at 30% load.
Per scenario: p50/p99 of the end-to-end latency before the promotion and while it takes
effect (from the promotion until every worker serves B, + 2 s), lost items, errors, and the
versions seen. Writes a table to docs/benchmarks.md and a latency-over-time plot to
docs/reload.png (matplotlib, if installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine, markdown_table, write_section

ROOT = Path(tempfile.gettempdir()) / "qscore-bench-reload"
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass
class Run:
    name: str
    load: float
    sent: dict[str, float] = field(default_factory=dict)  # batch id -> send time
    latency: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, ms, ver)
    last_received: float = 0.0
    promoted_at: float = 0.0
    switched_at: float = 0.0  # when the last old-version score was sent
    lost: int = 0
    errors: int = 0
    phases: list[dict[str, float]] = field(default_factory=list)  # per worker's reload_done


def versions(root: Path) -> tuple[str, str, str]:
    """(model id, version A (FP32, promoted first), version B (INT8 level 2))."""
    from engines.build import ensure_engine
    from engines.quantize import QuantSpec
    from engines.registry import EngineRegistry
    from engines.source import resolve_model

    source = resolve_model("default")
    a = ensure_engine(source, root, precision="fp32")
    b = ensure_engine(source, root, precision="int8", quant=QuantSpec(level="2"),
                      promote=False)
    EngineRegistry(root).promote(source.model_id, a.name, smoke=False)
    return source.model_id, a.name, b.name


async def stream(bootstrap: str, prefix: str, queries: list[str], rate: float,
                 seconds: float, run: Run, on_tick: object) -> None:
    """Publish QueryBatches of 4 at `rate` items/s for `seconds`; read every score back."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from plumbing.kafka import KafkaSettings, Topics
    from qscore.client import QueryProducer
    from schemas import QueryItem

    topics = Topics.with_prefix(prefix)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=5)
    await consumer.start()
    consumer.assign([TopicPartition(topics.scores, p) for p in range(4)])
    for tp in consumer.assignment():
        await consumer.position(tp)
    left: dict[str, int] = {}
    drained = asyncio.Event()  # set when nothing sent is still unanswered

    async def read() -> None:
        while True:
            records = await consumer.getmany(timeout_ms=100)
            now = run.last_received = time.perf_counter()
            for recs in records.values():
                for rec in recs:
                    batch = orjson.loads(rec.value)  # type: ignore[arg-type]
                    b = batch["batch_id"]
                    if b not in left:
                        continue
                    for it in batch["items"]:
                        run.errors += it.get("error") is not None
                        run.latency.append((run.sent[b], (now - run.sent[b]) * 1000,
                                            it["model_version"]))
                    left[b] -= len(batch["items"])
                    if left[b] <= 0:
                        del left[b]
            if not left:
                drained.set()
            else:
                drained.clear()

    reader = asyncio.create_task(read())
    started = time.perf_counter()
    n = 0
    async with QueryProducer(KafkaSettings(bootstrap_servers=bootstrap), topics) as producer:
        while (now := time.perf_counter()) - started < seconds:
            await on_tick(now - started)  # type: ignore[operator]
            due = int((now - started) * rate / 4)
            while n < due:
                b = f"{run.name}-{uuid.uuid4().hex[:8]}"
                items = [QueryItem(id=str(k), query=f"{queries[(4 * n + k) % len(queries)]} "
                                                     f"{b}") for k in range(4)]
                run.sent[b] = time.perf_counter()
                left[b] = 4
                await producer.send(items, batch_id=b)
                n += 1
            await asyncio.sleep(0.005)
        await producer.flush()
    drained.clear()
    with contextlib.suppress(TimeoutError):  # what is still missing after 60 s is lost
        await asyncio.wait_for(drained.wait(), 60)
    run.lost = sum(left.values())
    reader.cancel()
    await consumer.stop()


def capacity(bootstrap: str, prefix: str, queries: list[str]) -> float:
    """Items/s the fleet delivers when offered more than it can do (a short probe)."""
    probe = Run("probe", 1.0)

    async def noop(_: float) -> None:
        return None

    asyncio.run(stream(bootstrap, prefix, queries, 2000, 2, probe, noop))
    if not probe.latency:
        return 0.0
    first = min(s for s, _, _ in probe.latency)
    return len(probe.latency) / (probe.last_received - first)


def scenario(name: str, load: float, env: dict[str, str], root: Path, model: str,
             a: str, b: str, queries: list[str], seconds: float, promote_at: float,
             restart: bool = False) -> Run:
    from engines.registry import EngineRegistry
    from qscore.local.fleet import FleetSpec, LocalFleet, ServiceProcess

    os.environ.update(env)
    prefix = f"reload-{uuid.uuid4().hex[:6]}"
    spec = FleetSpec(artifact=EngineRegistry(root).get(model), tokenizers=1, workers=2,
                     topic_prefix=prefix, follow=None if restart else (root, "default"))
    run = Run(name, load)
    with LocalFleet(spec) as fleet:
        cap = capacity(fleet.bootstrap_servers, prefix, queries)
        rate = max(20.0, cap * load)
        print(f"{name}: capacity {cap:,.0f} items/s, offering {rate:,.0f}", flush=True)
        state = {"done": False}

        async def tick(t: float) -> None:
            if t < promote_at or state["done"]:
                return
            state["done"] = True
            run.promoted_at = time.perf_counter()
            EngineRegistry(root).promote(model, b, smoke=False)
            if restart:  # one worker at a time, pinned to B
                for i in range(len(fleet.workers)):
                    old = fleet.workers[i]
                    await asyncio.to_thread(old.stop)
                    new = ServiceProcess(
                        name=f"worker-b{i}", args=["worker", "--bootstrap-servers",
                                                   fleet.bootstrap_servers, "--topic-prefix",
                                                   prefix, "--engine",
                                                   str(EngineRegistry(root).get(model, b)),
                                                   *(["--fast-groups"] if fleet.broker
                                                     else [])],
                        log_path=fleet.workdir / f"worker-b{i}.log", env=fleet.common_env())
                    fleet.workers[i] = new.start()
                run.switched_at = time.perf_counter()  # both restarted (B serving once up)

        asyncio.run(stream(fleet.bootstrap_servers, prefix, queries, rate, seconds, run, tick))
        run.phases = [phases for w in fleet.workers for phases in reload_phases(w.log_path)]
    old_sent = [s for s, _, v in run.latency if v == a and s >= run.promoted_at]
    if not restart:  # when the last score of A was asked for
        run.switched_at = max(old_sent) if old_sent else run.promoted_at
    return run


def reload_phases(log_path: Path) -> list[dict[str, float]]:
    """The phase timings of each `reload_done` a worker logged (console or JSON lines)."""
    out = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if "reload_done" not in line:
            continue
        if line.lstrip().startswith("{"):
            fields = {k: v for k, v in json.loads(line).items() if isinstance(v, int | float)}
        else:
            fields = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)(?:\s|$)", line)}
        out.append({k: float(v) for k, v in fields.items()})
    return out


PHASES = ("verify", "load_read", "load_session", "load_copy", "load_build", "load_capture",
          "load", "warmup", "check_load", "check", "total")


def phase_rows(runs: list[Run]) -> list[list[str]]:
    """One row per scenario: each phase's seconds, median over the workers that reloaded."""
    rows = []
    for run in runs:
        if not run.phases:
            continue
        cells = []
        for name in PHASES:
            got = [p[name] for p in run.phases if name in p]
            cells.append(f"{np.median(got):.3f}" if got else "-")
        rows.append([run.name, str(len(run.phases)), *cells])
    return rows


def summary(run: Run, a: str, b: str) -> list[str]:
    before = [ms for s, ms, _ in run.latency if s < run.promoted_at]
    during = [ms for s, ms, _ in run.latency
              if run.promoted_at <= s <= run.switched_at + 2.0]
    after_switch = {v for s, _, v in run.latency if s > run.switched_at + 0.5}

    def p(xs: list[float], q: float) -> str:
        return f"{np.percentile(xs, q):.0f}" if xs else "-"

    ratio = (f"{np.percentile(during, 99) / np.percentile(before, 99):.2f}x"
             if before and during else "-")
    return [run.name, f"{run.load:.0%}", p(before, 50), p(before, 99), p(during, 50),
            p(during, 99), ratio, f"{run.switched_at - run.promoted_at:.1f}", str(run.lost),
            str(run.errors), ", ".join(sorted("A" if v == a else "B" if v == b else v
                                              for v in after_switch)) or "-"]


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), sharex=True)
    for ax, run in zip(np.atleast_1d(axes), runs, strict=True):
        t0 = min(s for s, _, _ in run.latency)
        secs = np.array([s - t0 for s, _, _ in run.latency])
        ms = np.array([m for _, m, _ in run.latency])
        edges = np.arange(0, secs.max() + 1)
        for q, style in ((50, "-"), (99, "--")):
            vals = [np.percentile(ms[(secs >= e) & (secs < e + 1)], q)
                    if ((secs >= e) & (secs < e + 1)).any() else np.nan for e in edges]
            ax.plot(edges, vals, style, label=f"p{q}")
        ax.axvline(run.promoted_at - t0, color="k", lw=0.8)
        ax.axvspan(run.promoted_at - t0, run.switched_at - t0 + 2, color="orange", alpha=0.2)
        ax.set_ylabel("ms")
        ax.set_title(f"{run.name} ({run.load:.0%} load)", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    np.atleast_1d(axes)[-1].set_xlabel("seconds (promotion: vertical line; shaded: until "
                                        "every worker serves the new version, + 2 s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--promote-at", type=float, default=12)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--scenarios", default="abc",
                        help="which of (a) (b) (c) to run, e.g. 'a' to repeat the first")
    args = parser.parse_args()
    from plumbing.logs import configure_logging

    configure_logging("warning")
    queries, source_name = load_queries(None)
    root = ROOT / "engines"
    fast = {"QSCORE_RELOAD_POLL_S": "0.5", "QSCORE_RELOAD_JITTER_S": "1",
            "QSCORE_RELOAD_QUIET_S": "3", "QSCORE_RELOAD_QUIET_LOAD": "0.5",
            "QSCORE_RELOAD_DEADLINE_S": "60"}
    forced = {**fast, "QSCORE_RELOAD_QUIET_LOAD": "1.0", "QSCORE_RELOAD_QUIET_S": "0.1",
              "QSCORE_RELOAD_DEADLINE_S": "1"}
    runs = []
    for name, load, env, restart in (("(a) reload controller", 0.3, fast, False),
                                     ("(b) forced reload", 0.9, forced, False),
                                     ("(c) restart each worker", 0.3, fast, True)):
        if name[1] not in args.scenarios:
            continue
        model, a, b = versions(root)  # A promoted again before each scenario
        runs.append(scenario(name, load, env, root, model, a, b, queries, args.seconds,
                             args.promote_at, restart=restart))
        print(summary(runs[-1], a, b), flush=True)
    table = markdown_table(
        ["scenario", "offered load", "p50 before", "p99 before", "p50 during", "p99 during",
         "p99 during / before", "seconds to switch", "lost", "errors", "versions after"],
        [summary(r, a, b) for r in runs])
    phase_table = markdown_table(["scenario", "workers", *(f"{p} s" for p in PHASES)],
                                 phase_rows(runs))
    plotted = not args.no_write and plot(runs, DOCS / "reload.png")
    body = (
        "## Hot reload under load (`bench/reload.py`)\n\n"
        f"Machine: {machine()}. `qscore up`'s fleet (embedded broker, 1 tokenizer, 2 scoring "
        "workers following the registry) serving version A (FP32) of the default model; "
        f"real queries ({source_name}) in QueryBatches of 4 at a share of the fleet's "
        "measured capacity; at "
        f"{args.promote_at:g} s version B (INT8 level 2) is promoted. Latency in ms, end to "
        "end; *during* = requests sent from the promotion until every worker serves B, "
        "+ 2 s. Reload options for a bench: poll 0.5 s, jitter up to 1 s, quiet for 3 s "
        "below 50% load; (b) forces it (quiet load 1.0, deadline 1 s).\n\n"
        f"{table}\n\n"
        "Phases of each reload (seconds, median over the workers; from their `reload_done` "
        "log lines; `verify` runs paced as soon as the promotion is seen, before the window; "
        "`load` includes ONNX Runtime's `load_read` and `load_session`, GPU runtimes report "
        "`load_copy`, `load_build`, `load_capture`):\n\n"
        f"{phase_table}\n\n"
        + ("![latency over time](reload.png)\n\n" if plotted else "")
        + f"Command: `.venv/bin/python bench/reload.py --seconds {args.seconds:g} "
          f"--promote-at {args.promote_at:g}`\n")
    print(body)
    if not args.no_write:
        write_section("reload", body)


if __name__ == "__main__":
    main()
