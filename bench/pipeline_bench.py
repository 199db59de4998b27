"""Pipeline throughput and freshness: one quotameter worker beside
raw aiokafka consumption (the ceiling) and a naive Faust agent, in one run.

    .venv/bin/python bench/pipeline_bench.py             # 200k events, ~4 minutes
    .venv/bin/python bench/pipeline_bench.py --quick     # 50k events, ~2 minutes

It starts its own redis-server and Tansu broker (quotameter.embedded, real
processes on loopback, stopped by PID at the end), works in a temporary
directory (chDB history, Faust data, logs) that it removes, and:

1. pre-produces N realistic usage events (quotameter.events, Zipf-like mix
   of customers, models, refusals, cached / reasoning tokens; key = customer
   id, Kafka timestamp = event time) to a fresh 4-partition topic with
   aiokafka's producer (linger + batching);
2. reads that topic with a plain AIOKafkaConsumer: the ceiling (and once more
   decoding each event with quotameter.events.decode_event, for context);
3. runs a naive Faust agent (defined below: memory store, its own app id, one
   table update per event, no group_by: the topic is already keyed by
   customer) over the same topic, in a child process of this script;
4. runs one ``quotameter worker`` (its own app id, history dir and port) over
   the same topic from the beginning, polling ``GET /stats`` until every event
   is in the ledger, then checks the ledger's count over ``POST /query``;
   then a fresh one over a second topic holding the same events as the shim
   sends them (``ShimRecords``: one record per partition and turn of the
   shim's sender, a CloudEvents batch); each with its process CPU per event;
5. stops it, starts a fresh worker on a fresh topic, produces at a fixed rate
   (default 5k events/s) for ``--duration`` seconds with event time = send
   time, in the shim's records every 5 ms, waits until the ledger has them
   all, and reads the worker's freshness p50 / p99 (event time -> Redis
   written, -> ClickHouse inserted) from ``GET /stats``.

Targets: >= 20k events/s per worker (batched records), >= 4x the naive agent,
freshness p99 <= 1 s to Redis and <= 5 s to ClickHouse.

``--py-spy FILE`` also samples the batched-records worker of step 4 with
py-spy (pip install py-spy) and prints the functions it spent its time in,
and CPU µs per event by area.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quotameter.config import DEFAULT_CONFIG  # noqa: E402
from quotameter.embedded.broker import broker_process  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.events import RequestData, UsageEvent, decode_event, encode_event, new_event_id  # noqa: E402

TARGET_EVENTS_S, TARGET_VS_NAIVE, TARGET_REDIS_P99_MS, TARGET_CH_P99_MS = 20_000, 4.0, 1_000, 5_000
PARTITIONS = 4  # pipeline.app.TOPIC_PARTITIONS: the worker's tables are co-partitioned with it
WORKER_READY_TIMEOUT_S = 120.0
NAIVE_MAX_S = 150.0
STATS_POLL_S = 0.5  # the naive agent's rate is read from what it did by then
PRODUCER_OPTIONS = {"linger_ms": 20, "max_batch_size": 1024 * 1024, "acks": 1}

MODELS = [  # (model requested, model served, weight)
    ("mock-small", "mock-small", 40),
    ("gpt-4o-mini", "gpt-4o-mini", 25),
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", 10),
    ("gpt-4o", "gpt-4o", 10),
    ("gpt-4o", "gpt-4o-2024-08-06", 5),
    ("mistral-large", "mistral-large", 2),  # unpriced: flagged, never dropped
]
ROUTES = ["/v1/chat/completions"] * 8 + ["/v1/completions", "/v1/embeddings"]
REFUSALS = ["rate_limit_requests", "rate_limit_tokens", "quota_tokens", "concurrency"]


# ---------------------------------------------------------------- events


class EventMaker:
    """Realistic v1 events from a fixed seed: customers weighted Zipf-like
    (a few heavy, a long tail), each with its tier and a couple of keys."""

    def __init__(self, customers: int, seed: int = 4) -> None:
        self.rng = random.Random(seed)
        self.customers = [f"cust-{i:04d}" for i in range(customers)]
        self.weights = [1 / (rank + 1) ** 0.9 for rank in range(customers)]
        self.tier = {c: self.rng.choices(["free", "pro", "enterprise"], [3, 6, 1])[0] for c in self.customers}
        self.models = [(req, served) for req, served, _ in MODELS]
        self.model_weights = [w for *_, w in MODELS]

    def pick_customers(self, n: int) -> list[str]:
        return self.rng.choices(self.customers, self.weights, k=n)

    def event(self, customer: str, at: datetime) -> UsageEvent:
        rng = self.rng
        requested, served = rng.choices(self.models, self.model_weights)[0]
        refused = rng.random() < 0.03
        streamed = rng.random() < 0.6
        data: dict[str, Any] = {
            "api_key_id": f"key-{customer}-{rng.randrange(3)}",
            "tier": self.tier[customer],
            "route": rng.choice(ROUTES),
            "model_requested": requested,
            "streamed": streamed,
            "request_bytes": rng.randrange(200, 20_000),
        }
        if refused:
            data.update(status=429, decision="refused", reason=rng.choice(REFUSALS), usage_source="none",
                        latency_ms=round(rng.uniform(0.3, 2.0), 3), response_bytes=300)
        else:
            input_tokens = int(rng.lognormvariate(6.5, 1.0)) + 1
            output_tokens = int(rng.lognormvariate(5.0, 1.0)) + 1
            cached = input_tokens // 2 if rng.random() < 0.3 else 0
            reasoning = output_tokens // 3 if served.startswith("gpt-4o") and rng.random() < 0.1 else 0
            latency = rng.uniform(200, 8000)
            data.update(status=200, decision="admitted", model_served=served, upstream="http://127.0.0.1:8081/v1",
                        input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached,
                        reasoning_tokens=reasoning, usage_source="upstream" if rng.random() < 0.97 else "counted",
                        latency_ms=round(latency, 3), ttft_ms=round(latency / 10, 3) if streamed else None,
                        response_bytes=output_tokens * 6 + 400)
        return UsageEvent(id=new_event_id(), source="shim-bench", subject=customer, time=at, data=RequestData(**data))


def make_events(maker: EventMaker, n: int) -> list[tuple[bytes, bytes, int]]:
    """(key, value, timestamp ms) for n events, event time = now as each is made."""
    out = []
    for customer in maker.pick_customers(n):
        event = maker.event(customer, datetime.now(UTC))
        out.append((customer.encode(), encode_event(event), event.time_ms))
    return out


class ShimRecords:
    """Events as the shim's emitter sends them: each turn of its sender (up
    to 500 spooled events) becomes one record per partition, a CloudEvents
    batch naming each event's spool seq (gateway_shim.kafka_records)."""

    TURN = 500  # gateway_shim.emitter._BATCH

    def __init__(self) -> None:
        self.spool_id = uuid.uuid4().hex[:16].encode()
        self.seq = 0

    def records(self, events: list[tuple[bytes, bytes, int]]) -> list[tuple[int, Any]]:
        """(partition, gateway_shim.kafka_records.KafkaRecord) for ``events``, in order."""
        from gateway_shim.kafka_records import kafka_records
        from gateway_shim.spool import SpoolRecord
        from pipeline.usage_agent import partition_of

        out: list[tuple[int, Any]] = []
        for start in range(0, len(events), self.TURN):
            by_partition: dict[int, list[SpoolRecord]] = {}
            for key, value, ts in events[start : start + self.TURN]:
                by_partition.setdefault(partition_of(key, PARTITIONS), []).append(SpoolRecord(self.seq, key, ts, value))
                self.seq += 1
            for partition, spooled in by_partition.items():
                out.extend((partition, record) for record in kafka_records(self.spool_id, spooled))
        return out


# ---------------------------------------------------------------- Kafka side


async def create_topic(bootstrap: str, topic: str) -> None:
    from pipeline.topics import ensure_topic  # read-only use of the pipeline package

    await ensure_topic(bootstrap, topic, PARTITIONS)


async def produce_all(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int]]) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_OPTIONS)
    await producer.start()
    began = time.perf_counter()
    try:
        pending = []
        for key, value, ts in records:
            pending.append(await producer.send(topic, value, key=key, timestamp_ms=ts))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(records) / (time.perf_counter() - began)


async def produce_batched(bootstrap: str, topic: str, records: list[tuple[int, Any]]) -> float:
    """Records made by ShimRecords; returns records/s."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_OPTIONS)
    await producer.start()
    began = time.perf_counter()
    try:
        pending = [await producer.send(topic, r.value, key=r.key, partition=p, timestamp_ms=r.timestamp_ms,
                                       headers=r.headers) for p, r in records]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(records) / (time.perf_counter() - began)


async def consume_raw(bootstrap: str, topic: str, n: int, decode: bool, timeout_s: float = 120.0) -> float:
    """Events/s of a plain consumer (no group, no commits) reading the topic from the start."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        began = time.perf_counter()
        seen = 0
        while seen < n and time.perf_counter() - began < timeout_s:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                if decode:
                    for record in records:
                        decode_event(record.value)
                seen += len(records)
        return seen / (time.perf_counter() - began)
    finally:
        await consumer.stop()


async def produce_at_rate(bootstrap: str, topic: str, maker: EventMaker, rate: int, duration_s: float) -> tuple[int, float]:
    """Open loop: every 5 ms (the shim's linger) send what the schedule owes,
    each event timed at its send, in records as the shim makes them.
    Returns (events sent, the rate actually achieved)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")  # as the shim sends
    await producer.start()
    shim = ShimRecords()
    sent = 0
    pending: list[asyncio.Future] = []
    try:
        began = time.perf_counter()
        while (elapsed := time.perf_counter() - began) < duration_s:
            owed = int(elapsed * rate) - sent
            events = []
            for customer in maker.pick_customers(owed):
                event = maker.event(customer, datetime.now(UTC))
                events.append((customer.encode(), encode_event(event), event.time_ms))
            for partition, r in shim.records(events):
                pending.append(await producer.send(topic, r.value, key=r.key, partition=partition,
                                                   timestamp_ms=r.timestamp_ms, headers=r.headers))
            sent += max(owed, 0)
            if len(pending) > 5000:
                await asyncio.gather(*pending)
                pending.clear()
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)
        return sent, sent / (time.perf_counter() - began)
    finally:
        await producer.stop()


# ---------------------------------------------------------------- the naive Faust agent (child process)


def naive_agent_main(argv: list[str]) -> None:
    """A naive per-event Faust agent: decode, one table update per event.
    Writes its progress (count, time of first and latest event) to --out."""
    parser = argparse.ArgumentParser()
    for flag in ("--bootstrap", "--topic", "--app-id", "--datadir", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--floor", action="store_true", help="batches of up to 5000, counted and acked: nothing else")
    args = parser.parse_args(argv)

    import faust

    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        datadir=args.datadir,
        topic_partitions=PARTITIONS,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
    )
    topic = app.topic(args.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    tokens = app.Table("naive-tokens", default=int, partitions=PARTITIONS)
    state = {"count": 0, "first": None, "last": None}
    out = Path(args.out)

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(out)

    def seen(count: int) -> None:
        now = time.time()
        if state["first"] is None:
            state["first"] = now
        state["count"] += count
        state["last"] = now
        if state["count"] >= args.events:
            write()

    async def floor(stream: Any) -> None:
        # Faust's own cost per event on this stack: batches taken, nothing done.
        async for batch in stream.take(5000, within=0.25):
            seen(len(batch))

    async def meter(stream: Any) -> None:
        async for value in stream:
            event = decode_event(value)
            tokens[event.subject] += event.data.input_tokens + event.data.output_tokens
            seen(1)

    app.agent(topic, name="floor" if args.floor else "meter")(floor if args.floor else meter)

    @app.timer(0.5)
    async def progress() -> None:
        write()

    faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False).execute_from_commandline()


def run_naive(bootstrap: str, topic: str, n: int, work: Path, procs: list[ManagedProcess], floor: bool = False) -> dict[str, Any]:
    name = "floor" if floor else "naive"
    out = work / f"{name}.json"
    app_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    proc = ManagedProcess(
        name,
        [sys.executable, str(Path(__file__).resolve()), "_naive-agent", "--bootstrap", bootstrap, "--topic", topic,
         "--app-id", app_id, "--datadir", str(work / f"{name}-data"), "--out", str(out), "--events", str(n),
         *(["--floor"] if floor else [])],
        work / f"{name}.log", env={"PYTHONPATH": str(ROOT)},
    )
    procs.append(proc.start())
    began = time.monotonic()
    state: dict[str, Any] = {"count": 0, "first": None, "last": None}
    try:
        while time.monotonic() - began < NAIVE_MAX_S:
            if not proc.alive():
                raise RuntimeError(f"the naive agent exited; last log lines:\n{proc.log_tail()}")
            try:
                state = json.loads(out.read_text())
            except (OSError, ValueError):
                pass
            if state["count"] >= n:
                break
            time.sleep(0.2)
    finally:
        proc.stop()
        procs.remove(proc)
    if state["count"] < 2:
        raise RuntimeError(f"the naive agent consumed nothing in {NAIVE_MAX_S:.0f}s:\n{proc.log_tail()}")
    span = state["last"] - state["first"]
    return {"events": state["count"], "events_s": (state["count"] - 1) / span, "complete": state["count"] >= n}


# ---------------------------------------------------------------- the quotameter worker


def http_json(url: str, body: str | None = None, timeout_s: float = 10.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body.encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def worker_config(work: Path, name: str, redis_url: str, bootstrap: str, topic: str) -> tuple[Path, str]:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    worker_url = f"http://127.0.0.1:{free_port()}"
    document["services"] = {
        **document["services"],
        "redis_url": redis_url,
        "redis_prefix": f"qm{name}",
        "kafka_bootstrap": bootstrap,
        "events_topic": topic,
        "history_dir": str(work / name / "history"),
        "worker_url": worker_url,
        "worker_app_id": f"bench-{name}-{uuid.uuid4().hex[:8]}",
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path, worker_url


def start_worker(work: Path, name: str, config_path: Path, url: str, procs: list[ManagedProcess]) -> tuple[ManagedProcess, float]:
    proc = ManagedProcess(name, [sys.executable, "-m", "quotameter", "worker"], work / f"{name}.log",
                          env={"PYTHONPATH": str(ROOT), "QUOTAMETER_CONFIG": str(config_path)}, cwd=ROOT)
    began = time.monotonic()
    procs.append(proc.start())

    def healthy() -> bool:
        try:
            return http_json(f"{url}/healthz", timeout_s=1)[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    proc.wait_until(healthy, WORKER_READY_TIMEOUT_S, "/healthz 200")
    return proc, time.monotonic() - began


def stats(url: str) -> dict[str, Any]:
    return http_json(f"{url}/stats")[1]


def wait_ledger(proc: ManagedProcess, url: str, n: int, timeout_s: float) -> dict[str, Any]:
    """Poll /stats until the ledger holds n rows. Returns the timings seen.

    Every /stats sorts the worker's freshness samples (up to 200k) on its
    event loop, so it is polled at STATS_POLL_S, not faster."""
    began = time.monotonic()
    first: tuple[float, int] | None = None  # (when, events taken) at the first poll that saw any
    last = {}
    while time.monotonic() - began < timeout_s:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited; last log lines:\n{proc.log_tail()}")
        last = stats(url)
        now = time.monotonic()
        if first is None and last.get("events", 0) > 0:
            first = (now, last["events"])
        if last.get("ledger_rows", 0) >= n:
            return {"done": now, "first": first, "stats": last, "complete": True}
        time.sleep(STATS_POLL_S)
    return {"done": time.monotonic(), "first": first, "stats": last, "complete": False}


def ledger_count(url: str) -> dict[str, int]:
    status, body = http_json(f"{url}/query", json.dumps(
        {"sql": "SELECT count() AS n, uniqExact(id) AS ids FROM quotameter.events"}))
    if status != 200:
        raise RuntimeError(f"ledger query failed: {status} {body}")
    row = body["rows"][0]
    return {"rows": int(row["n"]), "ids": int(row["ids"])}


def py_spy_record(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    binary = Path(sys.executable).parent / "py-spy"
    if not binary.exists():
        print(f"  (no {binary}: pip install py-spy to profile)")
        return None
    return subprocess.Popen([str(binary), "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                             "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def py_spy_summary(raw: Path, label: str, top: int = 16, cpu_us_per_event: float | None = None) -> None:
    """Where the worker's CPU went, from py-spy's collapsed stacks (active
    samples only); with the worker's CPU per event, each area's share of it."""
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    entry = ("quotameter/__main__.py", "quotameter/cli.py", "pipeline/worker.py")
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames, samples = stack.split(";"), int(count)
        total += samples
        for frame in set(frames):
            path = frame.rpartition(" (")[2]
            if path.startswith(("pipeline/", "quotameter/")) and not path.startswith(entry):
                inclusive[frame] += samples
        areas[_area(stack)] += samples
    if not total:
        print("  py-spy: no samples")
        return
    print(f"py-spy: {total} active samples at 100 Hz ({total / 100:.0f} s of CPU) in the {label} worker")
    print("  by area:")
    for area, count in areas.most_common():
        per_event = "" if cpu_us_per_event is None else f"{count / total * cpu_us_per_event:6.1f} µs/event  "
        print(f"    {count / total:6.1%}  {per_event}{area}")
    print("  quotameter code, inclusive:")
    for frame, count in inclusive.most_common(top):
        print(f"    {count / total:6.1%}  {frame}")


def _area(stack: str) -> str:
    if "Thread._bootstrap" in stack.split(";")[0]:
        return "chDB calls (executor thread)" if "chdb_store" in stack else "other threads"
    if "UsageSink._process" in stack:
        if "WindowTables" in stack:
            return "usage agent: window tables (read, apply, seed, write)"
        if "_decode" in stack:
            return "usage agent: decode + price"
        return "usage agent: the rest (dedupe, changelog flush, Redis, alerts, ledger buffer)"
    if "aiokafka/producer" in stack or "ProducerBuffer" in stack:
        return "Kafka producer (changelog records)"
    if "Fetcher" in stack or "aiokafka/consumer" in stack or "_drain_messages" in stack or "Stream." in stack:
        return "Kafka consumer / Faust stream"
    if "LedgerSink" in stack:
        return "ledger sink (event loop side)"
    if "aiohttp" in stack:
        return "HTTP (the bench polling /stats)"
    if "EpollSelector.select" in stack:
        return "event loop select"
    return "other (event loop, Faust, mode)"


def run_throughput(work: Path, redis_url: str, bootstrap: str, topic: str, n: int, procs: list[ManagedProcess],
                   profile: Path | None, name: str = "worker-throughput") -> dict[str, Any]:
    path, url = worker_config(work, name, redis_url, bootstrap, topic)
    began = time.monotonic()
    proc, ready_s = start_worker(work, name, path, url, procs)
    ready_at, cpu_at_ready = time.monotonic(), process_cpu_s(proc.pid)
    spy = py_spy_record(proc.pid, profile) if profile else None
    seen = wait_ledger(proc, url, n, timeout_s=max(120.0, n / 1000))
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(30)
    ledger = ledger_count(url)
    cpu_s = process_cpu_s(proc.pid)
    proc.stop(timeout_s=30)
    procs.remove(proc)
    done_rows = n if seen["complete"] else seen["stats"].get("ledger_rows", 0)
    first_at, first_events = seen["first"] or (seen["done"], done_rows)
    if done_rows - first_events >= done_rows / 2 and seen["done"] - first_at >= 2 * STATS_POLL_S:
        steady, measured_from = (done_rows - first_events) / (seen["done"] - first_at), "first events"
    else:
        # Most of the work fell between two polls (a few big batches): the
        # rate since the first poll that saw events would be a guess. From
        # "ready" on, it includes the wait for partitions: a lower bound.
        steady, measured_from = done_rows / max(seen["done"] - ready_at, STATS_POLL_S), "ready"
    return {"events_s": steady, "measured_from": measured_from, "wall_s": seen["done"] - began, "ready_s": ready_s,
            "ledger": ledger, "stats": seen["stats"], "complete": seen["complete"],
            "cpu_us_per_event": cpu_s * 1e6 / n, "cpu_us_per_event_after_ready": (cpu_s - cpu_at_ready) * 1e6 / n}


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process and its threads (Linux /proc), start-up included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_freshness(work: Path, redis_url: str, bootstrap: str, maker: EventMaker, rate: int, duration_s: float,
                  procs: list[ManagedProcess], profile: Path | None) -> dict[str, Any]:
    topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topic(bootstrap, topic))
    path, url = worker_config(work, "worker-freshness", redis_url, bootstrap, topic)
    proc, _ = start_worker(work, "worker-freshness", path, url, procs)
    spy = py_spy_record(proc.pid, profile) if profile else None
    sent, achieved = asyncio.run(produce_at_rate(bootstrap, topic, maker, rate, duration_s))
    seen = wait_ledger(proc, url, sent, timeout_s=60.0)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    proc.stop(timeout_s=30)
    procs.remove(proc)
    return {"sent": sent, "rate": achieved, "freshness": seen["stats"].get("freshness", {}),
            "complete": seen["complete"], "stats": seen["stats"]}


# ---------------------------------------------------------------- main


def code_state() -> str:
    """Whether the measured pipeline/ differs from the last commit (work in progress is measured as is)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "pipeline", "quotameter"],
                             capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    if out.returncode != 0:
        return " (not a git checkout)"
    changed = [line[3:] for line in out.stdout.splitlines()]
    return f" at {head.stdout.strip()}" + (f", with uncommitted changes in {', '.join(changed)}" if changed else ", clean")


def mark(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_naive-agent":
        naive_agent_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description="Pipeline worker throughput and freshness, beside raw and naive.")
    parser.add_argument("--quick", action="store_true", help="50k events, 10 s of sustained load")
    parser.add_argument("--events", type=int, help="events pre-produced (default 200000; --quick 50000)")
    parser.add_argument("--customers", type=int, default=500, help="distinct customers (default 500)")
    parser.add_argument("--rate", type=int, default=5000, help="events/s of the sustained-load phase (default 5000)")
    parser.add_argument("--duration", type=float, help="seconds of sustained load (default 20; --quick 10)")
    parser.add_argument("--py-spy", type=Path, metavar="FILE", help="profile the throughput worker into FILE (raw)")
    args = parser.parse_args()
    n = args.events or (50_000 if args.quick else 200_000)
    duration_s = args.duration or (10.0 if args.quick else 20.0)
    if not 1 <= args.customers <= 100_000 or not 1_000 <= n <= 2_000_000 or not 1 <= args.rate <= 50_000:
        parser.error("keep --customers in 1..100000, --events in 1000..2000000, --rate in 1..50000")
    if not 1 <= duration_s <= 300:
        parser.error("keep --duration in 1..300 s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below

    print(f"pipeline code measured: {ROOT / 'pipeline'}{code_state()}")
    print(f"pipeline bench: {n} events, {args.customers} customers, {PARTITIONS} partitions; loopback, "
          f"{os.cpu_count()} CPU cores shared by the broker, redis-server, producer and consumers\n")
    maker = EventMaker(args.customers)
    procs: list[ManagedProcess] = []
    results: dict[str, Any] = {}
    fresh_profile: Path | None = None
    with tempfile.TemporaryDirectory(prefix="qm-pipeline-bench-") as tmp:
        work = Path(tmp)
        try:
            redis_port, broker_port = free_port(), free_port()
            redis_url, bootstrap = f"redis://127.0.0.1:{redis_port}/0", f"127.0.0.1:{broker_port}"
            procs.append(redis_process(redis_port, work / "redis", work / "redis.log", persist=False).start())
            procs[-1].wait_port("127.0.0.1", redis_port, timeout_s=20)
            procs.append(broker_process(broker_port, work / "broker.log").start())
            procs[-1].wait_port("127.0.0.1", broker_port, timeout_s=30)

            topic = f"bench-events-{uuid.uuid4().hex[:8]}"
            asyncio.run(create_topic(bootstrap, topic))
            began = time.perf_counter()
            records = make_events(maker, n)
            made_s = time.perf_counter() - began
            results["produce"] = asyncio.run(produce_all(bootstrap, topic, records))
            print(f"made {n} events in {made_s:.1f} s ({sum(len(v) for _, v, _ in records) / n:.0f} bytes each); "
                  f"produced at {results['produce']:,.0f} events/s")
            batched_topic = f"bench-batched-{uuid.uuid4().hex[:8]}"
            asyncio.run(create_topic(bootstrap, batched_topic))
            batched = ShimRecords().records(records)
            asyncio.run(produce_batched(bootstrap, batched_topic, batched))
            print(f"the same events as the shim sends them: {len(batched)} records "
                  f"({n / len(batched):.0f} events each) to a second topic")
            del records, batched

            results["raw"] = asyncio.run(consume_raw(bootstrap, topic, n, decode=False))
            print(f"raw aiokafka consumer: {results['raw']:,.0f} events/s")
            results["raw_decode"] = asyncio.run(consume_raw(bootstrap, topic, n, decode=True))
            print(f"raw consumer + decode_event: {results['raw_decode']:,.0f} events/s")

            results["naive"] = run_naive(bootstrap, topic, n, work, procs)
            done = "" if results["naive"]["complete"] else f" (stopped after {NAIVE_MAX_S:.0f} s at " \
                f"{results['naive']['events']} events)"
            print(f"naive Faust agent: {results['naive']['events_s']:,.0f} events/s{done}")
            results["floor"] = run_naive(bootstrap, topic, n, work, procs, floor=True)
            print(f"Faust floor (take, no work): {results['floor']['events_s']:,.0f} events/s")

            for key, label, on_topic, profile in (("worker_single", "one event per record", topic, None),
                                                  ("worker", "batched records", batched_topic, args.py_spy)):
                results[key] = run_throughput(work, redis_url, bootstrap, on_topic, n, procs, profile, f"worker-{key}")
                w = results[key]
                print(f"quotameter worker, {label}: {w['events_s']:,.0f} events/s to the ledger, measured from "
                      f"{w['measured_from']} ({w['cpu_us_per_event']:.0f} CPU µs per event, "
                      f"{w['cpu_us_per_event_after_ready']:.0f} after start-up; ready in {w['ready_s']:.1f} s, "
                      f"all {n} in the ledger {w['wall_s']:.1f} s after start; ledger rows {w['ledger']['rows']}, "
                      f"ids {w['ledger']['ids']}; batches {w['stats'].get('batches')}, "
                      f"ledger inserts {w['stats'].get('ledger_inserts')}, lookups {w['stats'].get('ledger_lookups')})")

            fresh_profile = args.py_spy.with_name(args.py_spy.name + ".fresh") if args.py_spy else None
            results["fresh"] = run_freshness(work, redis_url, bootstrap, maker, args.rate, duration_s, procs,
                                             fresh_profile)
            f = results["fresh"]
            print(f"sustained load: {f['sent']} events at {f['rate']:,.0f} events/s for {duration_s:.0f} s "
                  f"({f['stats'].get('batches')} batches, {f['stats'].get('ledger_inserts')} ledger inserts); "
                  f"freshness {json.dumps(f['freshness'])}\n")
        except Exception:
            for proc in procs:
                print(f"--- {proc.name} log tail ---\n{proc.log_tail(30)}", file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                proc.stop()
        for label, raw, cpu_us in (("throughput", args.py_spy, results.get("worker", {}).get("cpu_us_per_event")),
                                   ("sustained-load", fresh_profile, None)):
            if raw is not None and raw.exists():
                py_spy_summary(raw, label, cpu_us_per_event=cpu_us)
                print()

    report(results, n, args.rate, duration_s)


def report(r: dict[str, Any], n: int, rate: int, duration_s: float) -> None:
    raw, naive, worker = r["raw"], r["naive"]["events_s"], r["worker"]["events_s"]
    single = r["worker_single"]
    fresh = r["fresh"]["freshness"]
    redis_p50, redis_p99 = (fresh.get("redis", {}).get(k) for k in ("p50_ms", "p99_ms"))
    ch_p50, ch_p99 = (fresh.get("clickhouse", {}).get(k) for k in ("p50_ms", "p99_ms"))
    exact = r["worker"]["ledger"] == {"rows": n, "ids": n} and single["ledger"] == {"rows": n, "ids": n}

    print(f"{'consumer of the same ' + format(n, ',') + ' events':<46}{'events/s':>10}{'of ceiling':>12}")
    print("-" * 68)
    for name, value in (("raw aiokafka consumer (ceiling)", raw), ("raw consumer + decode_event", r["raw_decode"]),
                        ("naive Faust agent, 1 table update per event", naive),
                        ("Faust floor: empty agent taking batches", r["floor"]["events_s"]),
                        ("quotameter worker, one event per record", single["events_s"]),
                        ("quotameter worker, batched records (shim)", worker)):
        print(f"{name:<46}{value:>10,.0f}{value / raw:>12.0%}")
    print(f"\nfreshness at {r['fresh']['rate']:,.0f} events/s for {duration_s:.0f} s "
          f"(event time -> written; {r['fresh']['sent']} events):")
    print(f"  to Redis       p50 {redis_p50} ms   p99 {redis_p99} ms")
    print(f"  to ClickHouse  p50 {ch_p50} ms   p99 {ch_p99} ms\n")

    checks = [
        (f">= {TARGET_EVENTS_S:,} events/s per worker", f"{worker:,.0f} events/s", worker >= TARGET_EVENTS_S),
        (f">= {TARGET_VS_NAIVE:.0f}x the naive agent", f"{worker / naive:.1f}x", worker / naive >= TARGET_VS_NAIVE),
        (f"freshness p99 <= {TARGET_REDIS_P99_MS / 1000:.0f} s to Redis", f"{redis_p99} ms",
         redis_p99 is not None and redis_p99 <= TARGET_REDIS_P99_MS and r["fresh"]["complete"]),
        (f"freshness p99 <= {TARGET_CH_P99_MS / 1000:.0f} s to ClickHouse", f"{ch_p99} ms",
         ch_p99 is not None and ch_p99 <= TARGET_CH_P99_MS and r["fresh"]["complete"]),
    ]
    print(f"{'target':<40}{'measured':>16}   verdict")
    print("-" * 68)
    for name, measured, ok in checks:
        print(f"{name:<40}{measured:>16}   {mark(ok)}")
    print(f"{'ledger exact (rows = ids = events)':<40}{r['worker']['ledger']['rows']:>16}   {mark(exact)}")
    print(f"\nworker CPU per event (process CPU / events): "
          f"{single['cpu_us_per_event']:.0f} µs one event per record, {r['worker']['cpu_us_per_event']:.0f} µs batched "
          f"(start-up included); {single['cpu_us_per_event_after_ready']:.0f} and "
          f"{r['worker']['cpu_us_per_event_after_ready']:.0f} µs after start-up")
    met = sum(ok for *_, ok in checks)
    print(f"\n{met} of {len(checks)} targets met" + ("" if met == len(checks) else
          ": " + "; ".join(name for name, _, ok in checks if not ok) + " NOT met"))


if __name__ == "__main__":
    main()
