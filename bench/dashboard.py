"""The Grafana dashboard's panels, drawn from a local fleet's Prometheus data (docs/dashboard.png).

Grafana cannot run here: it is not in Debian's archive and no package registry we reach ships
its server. So this script draws the panels of deploy/grafana/dashboards/qscore.json itself,
with matplotlib, from the data a real Prometheus (Debian's `prometheus` package) scraped from
a local fleet: every panel's PromQL expressions are evaluated by that Prometheus exactly as
written in the dashboard (`$__rate_interval` set as Grafana sets it: max(step + scrape
interval, 4 scrape intervals)), and laid out by the panels' gridPos.

The fleet: embedded broker, redis-server, 1 tokenizer and 2 scoring workers following the
engine registry (as bench/reload.py starts them), each serving /metrics on its own port,
scraped every second. The load, for `--seconds`: real queries in QueryBatches of 4 at a share
of the fleet's measured capacity, a third of the items repeating earlier queries (cache
hits); an offline re-scoring burst (consumer lag); a promotion of version B (INT8) while it
runs (hot reload); a burst of online traffic (larger batches); a few poison messages (dead
letters at the tokenizer and at the workers; one of each is sent before the window too, so
that each reason's series exists, as in a fleet that has run a while).

Run: .venv/bin/python bench/dashboard.py [--seconds 90] [--no-write]
Needs: prometheus on PATH (apt-get install prometheus) and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import load_queries, machine
from bench.reload import ROOT as RELOAD_ROOT
from bench.reload import capacity, versions

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "qscore.json"
DOCS = REPO / "docs"
SCRAPE_S = 1
# Reload options for a bench: short waits, and a deadline short enough that the reload
# happens inside the run even on a host busy with other work (then at the quietest moment).
RELOAD_ENV = {"QSCORE_RELOAD_POLL_S": "0.5", "QSCORE_RELOAD_JITTER_S": "1",
              "QSCORE_RELOAD_QUIET_S": "2", "QSCORE_RELOAD_QUIET_LOAD": "0.6",
              "QSCORE_RELOAD_DEADLINE_S": "15"}


# -- the fleet and its Prometheus ------------------------------------------------------------
class Prometheus:
    """Debian's prometheus, scraping `targets` (job -> [(instance, port)]) every second."""

    def __init__(self, workdir: Path, targets: dict[str, list[tuple[str, int]]]) -> None:
        from qscore.local.servers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": f"{SCRAPE_S}s",
                             "evaluation_interval": f"{SCRAPE_S}s"},
                  "scrape_configs": [
                      {"job_name": job, "static_configs": [
                          {"targets": [f"127.0.0.1:{port}"], "labels": {"instance": name}}
                          for name, port in services]}
                      for job, services in targets.items()]}
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not start; see {workdir}/"
                                       "prometheus.log") from None
                time.sleep(0.2)

    def query(self, path: str, **params: Any) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        if body["status"] != "success":
            raise RuntimeError(f"{params.get('query')}: {body}")
        return list(body["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def start_services(fleet: Any, tokenizers: int, workers: int) -> dict[str, list[tuple[str, int]]]:
    """Start the fleet's services, each with a --metrics-port of its own."""
    from qscore.local.servers import free_port

    targets: dict[str, list[tuple[str, int]]] = {"qscore-tokenizer": [], "qscore-worker": []}
    for kind, n, into in (("tokenizer", tokenizers, fleet.tokenizers),
                          ("worker", workers, fleet.workers)):
        for i in range(n):
            port = free_port()
            proc = fleet.service(kind, i)
            proc.args += ["--metrics-port", str(port)]
            into.append(proc.start())
            targets[f"qscore-{kind}"].append((f"{kind}-{i}", port))
    return targets


# -- the load --------------------------------------------------------------------------------
async def load(bootstrap: str, prefix: str, queries: list[str], rate: float, seconds: float,
               promote: Any, promote_at: float, marks: dict[str, float]) -> None:
    """Online QueryBatches of 4 at `rate` items/s (x2.5 from 65% to 75% of the run), a third
    of the items repeating a query sent a while ago; an offline burst at 10%; poison messages
    at 25%, 50% and 80%; `promote()` at `promote_at` s."""
    from plumbing.kafka import KafkaSettings, Topics, make_producer
    from qscore.client import QueryProducer
    from schemas import QueryItem

    topics = Topics.with_prefix(prefix)
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    rng = random.Random(13)
    sent: list[str] = []
    raw = make_producer(kafka)
    await raw.start()
    events = {0.10: "offline", 0.25: "poison", 0.50: "poison", 0.80: "poison"}
    try:
        async with QueryProducer(kafka, topics) as producer:
            started = last = time.perf_counter()
            due = 0.0  # items due so far
            while (t := (now := time.perf_counter()) - started) < seconds:
                if promote_at <= t and "promoted" not in marks:
                    marks["promoted"] = time.time()
                    await asyncio.to_thread(promote)
                for at in [a for a in events if a * seconds <= t]:
                    kind = events.pop(at)
                    marks[f"{kind}@{at:g}"] = time.time()
                    if kind == "offline":  # re-score a log: 600 items, batches of 20
                        for b in range(30):
                            tag = f"offline-{uuid.uuid4().hex[:6]}"
                            texts = [queries[(20 * b + k) % len(queries)] for k in range(20)]
                            await producer.send([QueryItem(id=str(k), query=f"{q} {tag}")
                                                 for k, q in enumerate(texts)],
                                                priority="offline")
                    else:
                        await poison(raw, producer, topics)
                burst = 2.5 if 0.65 * seconds <= t < 0.75 * seconds else 1.0
                due += rate * burst * (now - last)
                last = now
                while due >= 4:
                    due -= 4
                    batch = []
                    for k in range(4):
                        if len(sent) > 100 and rng.random() < 0.33:  # scored a while ago
                            text = sent[rng.randrange(max(0, len(sent) - 2000),
                                                      len(sent) - 50)]
                        else:
                            text = f"{queries[len(sent) % len(queries)]} {uuid.uuid4().hex[:6]}"
                            sent.append(text)
                        batch.append(QueryItem(id=str(k), query=text))
                    await producer.send(batch)
                await asyncio.sleep(0.005)
            await producer.flush()
    finally:
        await raw.stop()


async def poison(raw: Any, producer: Any, topics: Any) -> None:
    """Messages that must become dead letters: at the tokenizer (not JSON, an empty query, a
    reply topic outside the allow-list) and at the workers (a TokenBatch that is not one)."""
    from schemas import QueryItem

    now = time.time()
    empty = {"v": 1, "batch_id": f"p-{uuid.uuid4().hex[:6]}", "submitted_at": now,
             "items": [{"id": "a", "query": "   "}]}
    await raw.send_and_wait(topics.queries, b"{not json")
    await raw.send_and_wait(topics.queries, orjson.dumps(empty))
    await producer.send_and_wait([QueryItem(id="a", query="where do my scores go")],
                                 reply_topic="someone-elses-topic")
    await raw.send_and_wait(topics.tokens, b"QSTB garbage")


async def warm_poison(bootstrap: str, prefix: str) -> None:
    from plumbing.kafka import KafkaSettings, Topics, make_producer
    from qscore.client import QueryProducer

    kafka, topics = KafkaSettings(bootstrap_servers=bootstrap), Topics.with_prefix(prefix)
    raw = make_producer(kafka)
    await raw.start()
    try:
        async with QueryProducer(kafka, topics) as producer:
            await poison(raw, producer, topics)
    finally:
        await raw.stop()


# -- drawing ---------------------------------------------------------------------------------
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff",
           "#fade2a", "#37872d", "#e0b400"]
NAMED = {"green": "#73bf69", "yellow": "#fade2a", "orange": "#ff9830", "purple": "#b877d9",
         "red": "#f2495c"}


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out if fmt else ", ".join(f"{k}={v}" for k, v in labels.items())


def evaluate(prom: Prometheus, dashboard: dict[str, Any], start: float,
             end: float, step: int) -> dict[int, list[tuple[str, list[tuple[float, float]]]]]:
    """Per panel id: (legend, [(unix time, value)]) per series of each of its targets; an
    instant query (table) gives one point at `end`."""
    rate_interval = f"{max(step + SCRAPE_S, 4 * SCRAPE_S)}s"
    out: dict[int, list[tuple[str, list[tuple[float, float]]]]] = {}
    for panel in dashboard["panels"]:
        series = out.setdefault(panel["id"], [])
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            if target.get("instant"):
                for r in prom.query("query", query=expr, time=end):
                    series.append((json.dumps(r["metric"]), [(end, float(r["value"][1]))]))
                continue
            for r in prom.query("query_range", query=expr, start=start, end=end, step=step):
                points = [(float(t), float(v)) for t, v in r["values"]]
                series.append((legend(target.get("legendFormat", ""), r["metric"]), points))
    return out


def draw(dashboard: dict[str, Any], data: dict[int, list[tuple[str, list[tuple[float, float]]]]],
         marks: dict[str, float], start: float, end: float, path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(16, rows * 0.34 + 0.8), facecolor=BG)
    grid = fig.add_gridspec(rows, 24, left=0.04, right=0.99, top=1 - 0.8 / (rows * 0.34 + 0.8),
                            bottom=0.02, hspace=3.2, wspace=1.4)
    fig.text(0.01, 1 - 0.3 / (rows * 0.34 + 0.8), f"{dashboard['title']}", color=TEXT,
             fontsize=15, weight="bold", va="center")
    fig.text(0.99, 1 - 0.3 / (rows * 0.34 + 0.8), note, color="#8e8e9e", fontsize=8.5,
             ha="right", va="center")
    when = lambda t: datetime.fromtimestamp(t)  # noqa: E731
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"] + 1:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_facecolor(PANEL)
        for side in ax.spines.values():
            side.set_color(GRID)
        ax.tick_params(colors=TEXT, labelsize=7.5)
        ax.set_title(panel["title"], color=TEXT, fontsize=10, loc="left", weight="bold")
        series = data.get(panel["id"], [])
        if panel["type"] == "table":
            draw_table(ax, series)
            continue
        ax.grid(color=GRID, lw=0.6)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.set_xlim(when(start), when(end))
        for t in (marks.get("promoted"),):
            if t:
                ax.axvline(when(t), color="#8e8e9e", lw=0.9, ls="--")
        if panel["type"] == "state-timeline":
            draw_states(ax, panel, series, when)
            continue
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        scale = 1000.0 if unit == "s" else 1.0  # Grafana shows seconds below 1 as ms
        stacked = defaults["custom"]["stacking"]["mode"] == "normal"
        if stacked and series:
            times = sorted({t for _, pts in series for t, _ in pts})
            values = [[dict(pts).get(t, 0.0) for t in times] for _, pts in series]
            ax.stackplot([when(t) for t in times], values, colors=PALETTE[:len(values)],
                         labels=[name for name, _ in series], alpha=0.8)
        for i, (name, pts) in enumerate(series):
            if stacked or not pts:
                continue
            ax.plot([when(t) for t, _ in pts], [v * scale for _, v in pts], lw=1.3,
                    color=PALETTE[i % len(PALETTE)], label=name)
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(0, 1.05)
        elif unit == "s":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} ms"))
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(bottom=0)
        if axis := defaults["custom"].get("axisLabel"):
            ax.set_ylabel(axis, color=TEXT, fontsize=8)
        if series:
            ax.legend(loc="upper left", fontsize=7, facecolor=PANEL, edgecolor=GRID,
                      labelcolor=TEXT, ncol=2 if len(series) > 3 else 1, framealpha=0.85)
        else:
            ax.text(0.5, 0.5, "No data", color="#8e8e9e", ha="center", va="center",
                    transform=ax.transAxes)
    fig.savefig(path, dpi=80, facecolor=BG)


def draw_states(ax: Any, panel: dict[str, Any], series: list[Any], when: Any) -> None:
    """A state timeline: one band per series, coloured and named by the value mappings."""
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    states = {float(k): v for k, v in mapping["options"].items()}
    ax.set_yticks(range(len(series)), [name for name, _ in series])
    ax.set_ylim(-0.6, len(series) - 0.4)
    ax.grid(False)
    for row, (_, pts) in enumerate(series):
        for (t0, v), (t1, _) in zip(pts, [*pts[1:], (pts[-1][0] + 1, 0)], strict=True):
            state = states.get(v, {"text": f"{v:g}", "color": "green"})
            ax.barh(row, when(t1) - when(t0), left=when(t0), height=0.8,
                    color=NAMED.get(state["color"], state["color"]), edgecolor="none")
        # Name each run of one state where it starts (merged values, as Grafana shows
        # them), if it is wide enough for its name.
        runs = [i for i, (_, v) in enumerate(pts) if i == 0 or pts[i - 1][1] != v]
        span = pts[-1][0] - pts[0][0] or 1.0
        for i, j in zip(runs, [*runs[1:], len(pts) - 1], strict=True):
            if (pts[j][0] - pts[i][0]) / span >= 0.05:
                ax.text(when(pts[i][0]), row, " " + states.get(
                    pts[i][1], {"text": f"{pts[i][1]:g}"})["text"], color="#111217",
                        fontsize=7, va="center", clip_on=True)


def draw_table(ax: Any, series: list[Any]) -> None:
    ax.axis("off")
    columns = ["job", "instance", "model_id", "serving", "pending", "state"]
    rows = sorted([[json.loads(labels).get(c, "") for c in columns] for labels, _ in series],
                  key=lambda r: (r[0], r[1]))
    if not rows:
        ax.text(0.5, 0.5, "No data", color="#8e8e9e", ha="center", transform=ax.transAxes)
        return
    table = ax.table(cellText=rows, colLabels=columns, loc="upper left", cellLoc="left",
                     colLoc="left", bbox=[0, 0.05, 1, 0.9],
                     colWidths=[0.15, 0.1, 0.37, 0.13, 0.13, 0.12])
    table.auto_set_font_size(False)
    for (r, _), cell in table.get_celld().items():
        cell.set_facecolor(PANEL if r else "#22252b")
        cell.set_edgecolor(GRID)
        cell.get_text().set_color(TEXT)
        cell.get_text().set_fontsize(7.5 if r else 8)


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--promote-at", type=float, default=None,
                        help="seconds into the load (default: 40%% of it)")
    parser.add_argument("--load", type=float, default=0.3, help="share of measured capacity")
    parser.add_argument("--rate", type=float, default=None,
                        help="items/s to offer (default: --load x the measured capacity)")
    parser.add_argument("--no-write", action="store_true", help="draw to a temporary file")
    args = parser.parse_args()
    if shutil.which("prometheus") is None:
        sys.exit("prometheus is not installed: apt-get install prometheus (Debian)")
    from engines.registry import EngineRegistry
    from plumbing.logs import configure_logging
    from qscore.local.fleet import FleetSpec, LocalFleet

    configure_logging("warning")
    queries, source_name = load_queries(None)
    root = RELOAD_ROOT / "engines"
    model, a, b = versions(root)  # A promoted; B (INT8 level 2) built
    os.environ.update(RELOAD_ENV)
    prefix = f"dash-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="qscore-dashboard-"))
    dashboard = json.loads(DASHBOARD.read_text())
    promote_at = args.seconds * 0.4 if args.promote_at is None else args.promote_at
    spec = FleetSpec(artifact=EngineRegistry(root).get(model), tokenizers=0, workers=0,
                     topic_prefix=prefix, follow=(root, "default"), workdir=workdir)
    marks: dict[str, float] = {}
    with LocalFleet(spec) as fleet:
        targets = start_services(fleet, tokenizers=1, workers=2)
        prom = Prometheus(workdir, targets)
        try:
            capacity(fleet.bootstrap_servers, prefix, queries)  # waits for startup; warms up
            cap = capacity(fleet.bootstrap_servers, prefix, queries)
            rate = args.rate or max(20.0, cap * args.load)
            print(f"capacity {cap:,.0f} items/s; offering {rate:,.0f} items/s for "
                  f"{args.seconds:g} s, promotion at {promote_at:g} s", flush=True)
            # One poison message of each kind before the window: a dead-letter reason's
            # first count only creates its series, which rate() cannot see (a long-running
            # fleet has them); the ones in the window then show.
            asyncio.run(warm_poison(fleet.bootstrap_servers, prefix))
            time.sleep(8)  # the probe's rates leave the 4 s rate windows
            start = time.time()

            def promote() -> None:
                EngineRegistry(root).promote(model, b, smoke=False)

            asyncio.run(load(fleet.bootstrap_servers, prefix, queries, rate, args.seconds,
                             promote, promote_at, marks))
            time.sleep(15)  # the tail drains; the last lag samples and scrapes land
            end = time.time()
            data = evaluate(prom, dashboard, start, end, step=SCRAPE_S)
        finally:
            prom.stop()
    note = (f"drawn by bench/dashboard.py from Prometheus data (Grafana is not available "
            f"here) | local fleet: 1 tokenizer, 2 workers, {machine().split(',')[1].strip()} "
            f"| {rate:,.0f} items/s offered, {source_name.split(' (')[0]} | "
            f"dashed: promotion of version B")
    out = (Path(tempfile.gettempdir()) / "dashboard.png") if args.no_write else (
        DOCS / "dashboard.png")
    draw(dashboard, data, marks, start, end, out, note)
    print(f"wrote {out}; fleet logs in {workdir}", flush=True)
    print("versions:", a, "->", b, "| events:",
          {k: round(v - start, 1) for k, v in marks.items()})


if __name__ == "__main__":
    main()
