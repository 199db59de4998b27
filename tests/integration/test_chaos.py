"""Every served token billed exactly once, whatever stops.

``quotameter up`` runs as a user runs it while several official openai
clients send chat completions, JSON and streamed, for two customers on tiers
with real limits, billed in periods that start on the 15th in Auckland. One after another, each part of the stack is SIGKILLed
(the shim, the worker, the broker, Redis, the mock model) and the stack's
supervisor restarts it; then the whole process tree is SIGKILLed at once and
``quotameter up`` is started again on the same data directory. In a second
test, Ctrl-C stops ``quotameter up`` in the middle of the same traffic and it
is started again. At the end, for every customer, the ledger's raw rows and
Redis's period totals equal what the clients were served, to the token.

What a client was served: a JSON answer with its usage, a stream that ended
with its usage chunk, or a stream the upstream cut (the mock was killed),
whose prompt tokens are the client's fixed prompt and whose output tokens
are its content chunks (the mock sends one token per chunk). Anything that
failed (a connection error, a 5xx, a 429) was not served and must not be
billed, with one exception the shim chooses: it writes a request's event to
its spool just before the answer's last bytes, so a SIGKILL between the two
(a few microseconds) bills a whole answer whose end the client never got.
Each shim death may bill at most one such request, and only the exact
tokens of one of the answers the clients saw cut by a broken connection.
Clients never retry (``max_retries=0``): a retry is another request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import itertools
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import yaml

from quotameter.config import Config, load_config
from tests.integration.pipeline_helpers import wait_for
from tests.integration.stack_helpers import RunningStack, alive, descendants, stack_config, start_stack

pytestmark = pytest.mark.whole_machine  # run alone by make test (pyproject.toml)

CUSTOMERS = {"chaos-pro": "pro", "chaos-ent": "enterprise"}
ROLES = {  # how each part's command line is recognised
    "shim": lambda argv: argv[-1:] == ["proxy"] or "proxy" in argv[-2:],
    "worker": lambda argv: "worker" in argv[-2:],
    "mock-llm": lambda argv: "mock-llm" in argv,
    "broker": lambda argv: any("--listener-url" in a for a in argv),
    "redis": lambda argv: bool(argv) and ("redis-server" in argv[0] or "valkey-server" in argv[0]),  # it retitles itself
}
KILL_ORDER = ["worker", "shim", "broker", "mock-llm", "redis"]


def _argv(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _find(stack: RunningStack, role: str) -> int | None:
    for pid in sorted(descendants(stack.proc.pid)):
        if alive(pid) and ROLES[role](_argv(pid)):
            return pid
    return None


def _cli(config_path: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "quotameter", *args, "--config", str(config_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, f"quotameter {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@dataclass
class Ledger:
    """What one customer's clients were served."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    answers: Counter[tuple[int, int, bool]] = field(default_factory=Counter)  # (input, output, streamed)

    def serve(self, prompt: int, completion: int, how: str) -> None:
        self.requests += 1
        self.input_tokens += prompt
        self.output_tokens += completion
        self.outcomes[how] += 1
        self.answers[prompt, completion, how != "json"] += 1


class Client(threading.Thread):
    """One openai client sending requests back to back until told to stop."""

    def __init__(self, base_url: str, key: str, served: Ledger, lock: threading.Lock, stream: bool, n: int) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=15)
        self.served, self.lock, self.stream, self.n = served, lock, stream, n
        self.messages = [{"role": "user", "content": f"Client {n} counts to ten, slowly please."}]
        self.prompt_tokens: int | None = None
        self.broken: list[int] = []  # max_tokens of each answer a broken connection cut short
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            max_tokens = 3 + (i * 7 + self.n) % 12
            try:
                if self.stream:
                    self._stream(max_tokens)
                else:
                    reply = self.client.chat.completions.create(model="mock-small", messages=self.messages, max_tokens=max_tokens)
                    assert reply.usage is not None
                    self.prompt_tokens = reply.usage.prompt_tokens
                    self._served(reply.usage.prompt_tokens, reply.usage.completion_tokens, "json")
            except (openai.APIError, openai.APIConnectionError) as exc:
                with self.lock:
                    self.served.outcomes["failed"] += 1
                    if isinstance(exc, openai.APIConnectionError):
                        self.broken.append(max_tokens)
                time.sleep(0.05)
            time.sleep(0.01)

    def _stream(self, max_tokens: int) -> None:
        chunks, usage = 0, None
        stream = self.client.chat.completions.create(
            model="mock-small", messages=self.messages, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True},
        )
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
        except openai.APIConnectionError:
            if usage is None:
                raise
            # The usage chunk arrived, then the connection broke before the
            # stream's end: the client has the whole answer, and it was billed.
        if usage is not None:
            self.prompt_tokens = usage.prompt_tokens
            self._served(usage.prompt_tokens, usage.completion_tokens, "stream")
        else:  # cut by the upstream: billed as delivered (prompt counted, one token per chunk)
            assert self.prompt_tokens is not None, "a cut stream before any complete one"
            self._served(self.prompt_tokens, chunks, "cut stream")

    def _served(self, prompt: int, completion: int, how: str) -> None:
        with self.lock:
            self.served.serve(prompt, completion, how)


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return {}


def _ledger_rows(worker_url: str) -> dict[str, dict[str, int]]:
    sql = """SELECT customer, count() AS rows, uniqExact(id) AS ids, countIf(status = 200) AS ok,
                    sumIf(input_tokens, status = 200) AS ok_input, sumIf(output_tokens, status = 200) AS ok_output,
                    sumIf(input_tokens + output_tokens, status != 200) AS unserved_tokens
             FROM quotameter.events GROUP BY customer"""
    request = urllib.request.Request(f"{worker_url}/query", data=sql.encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        rows = json.loads(response.read())["rows"]
    return {row.pop("customer"): {k: int(v) for k, v in row.items()} for row in rows}


SHIM_DEATHS = 2  # its own SIGKILL, and the whole tree's


def _cut_at_the_shims_death(extra: dict[str, int], prompt: int, broken: list[int], deaths: int) -> bool:
    """Whether what the ledger billed beyond what clients were served is
    nothing, or at most one answer per shim death, each exactly one of the
    answers a broken connection cut short (the mock writes ``max_tokens``)."""
    if extra == {"ok": 0, "ok_input": 0, "ok_output": 0}:
        return True
    if not 0 < extra["ok"] <= deaths or extra["ok_input"] != extra["ok"] * prompt:
        return False
    return any(sum(pick) == extra["ok_output"] for pick in itertools.combinations(broken, extra["ok"]))


def _billed_answers(worker_url: str, customer: str) -> Counter[tuple[int, int, bool]]:
    sql = f"""SELECT input_tokens, output_tokens, streamed, usage_source, count() AS n FROM quotameter.events
              WHERE customer = '{customer}' AND status = 200 GROUP BY input_tokens, output_tokens, streamed, usage_source"""
    request = urllib.request.Request(f"{worker_url}/query", data=sql.encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        rows = json.loads(response.read())["rows"]
    return Counter({(int(r["input_tokens"]), int(r["output_tokens"]), bool(r["streamed"]), r["usage_source"]): int(r["n"])
                    for r in rows})


def _answers_that_differ(served: Counter[tuple[int, int, bool]], billed: Counter[tuple[int, int, bool]]) -> str:
    """(input, output, streamed) of the answers only one side has, with how the billed ones were counted."""
    plain = Counter[tuple[int, int, bool]]()
    for (i, o, streamed, _), n in billed.items():
        plain[i, o, streamed] += n
    sources = {key[:3]: key[3] for key in billed}
    return (f"served, not billed: {dict(served - plain)}; "
            f"billed, not served: { {(*k, sources.get(k)): n for k, n in (plain - served).items()} }")


def _billed_as_served(config: Config, config_path: Path, clients: list[Client], served: dict[str, Ledger],
                      shim_deaths: int) -> None:
    """Once the shim's spool is empty: for each customer the ledger's rows, Redis's
    period totals and what the clients were served agree, to the token, but for
    at most one answer per shim death (``_cut_at_the_shims_death``)."""
    # Every spooled event reaches the ledger; then the three views must agree.
    health = wait_for(
        lambda: (h := _get_json(f"http://{config.shim.host}:{config.shim.port}/healthz")).get("events", {})
        .get("spool", {}).get("depth") == 0 and h, 90, "the shim's spool to drain into the ledger",
    )
    expected = {c: {"ok": s.requests, "ok_input": s.input_tokens, "ok_output": s.output_tokens} for c, s in served.items()}
    prompt = {c: next(k.prompt_tokens for k in clients if k.served is served[c] and k.prompt_tokens) for c in CUSTOMERS}
    broken = {c: sorted(mt for k in clients if k.served is served[c] for mt in k.broken) for c in CUSTOMERS}
    deadline = time.monotonic() + 30  # for the ledger to hold every served request; the checks below say what lacks
    while time.monotonic() < deadline and not all(
            _ledger_rows(config.services.worker_url).get(c, {}).get("ok", 0) >= e["ok"] for c, e in expected.items()):
        time.sleep(0.2)
    time.sleep(2)  # anything more would be a duplicate or an unserved request: let it land, then look
    ledger = _ledger_rows(config.services.worker_url)
    for customer, seen in served.items():
        print(f"{customer}: served {seen.requests} requests ({dict(seen.outcomes)}), "
              f"{seen.input_tokens} input / {seen.output_tokens} output tokens; ledger {ledger.get(customer)}")
    print(f"spool: {health['events']}")
    billed = {}  # what Redis must hold: the ledger's totals
    for customer, want in expected.items():
        rows = ledger[customer]
        assert rows["rows"] == rows["ids"], f"{customer}: duplicate rows in the ledger: {rows}"
        assert rows["unserved_tokens"] == 0, f"{customer}: tokens billed on refused or failed requests: {rows}"
        assert sum(seen for how, seen in served[customer].outcomes.items() if how != "failed") == want["ok"]
        extra = {k: rows[k] - want[k] for k in want}
        assert _cut_at_the_shims_death(extra, prompt[customer], broken[customer], shim_deaths), (
            f"{customer}: ledger {rows} != served {want}; answers cut by a broken connection: {broken[customer]}; "
            + _answers_that_differ(served[customer].answers, _billed_answers(config.services.worker_url, customer)))
        if extra["ok"]:
            print(f"{customer}: {extra['ok']} answer(s) billed as the shim died sending their end: {extra}")
        billed[customer] = rows

    # Redis's period totals, as `quotameter usage` shows them beside the ledger's.
    for customer, want in expected.items():
        report = wait_for(lambda: (r := json.loads(_cli(config_path, "usage", "--customer", customer, "--json")))["in_sync"] and r,
                       30, f"{customer}'s quota state to match the ledger")
        redis_side = report["redis"]
        assert (int(redis_side["input_tokens"]), int(redis_side["output_tokens"])) == (
            billed[customer]["ok_input"], billed[customer]["ok_output"]), report


def _chaos_config(directory: Path) -> tuple[Path, Config]:
    config_path = stack_config(directory)
    document = yaml.safe_load(config_path.read_text())
    document["shim"]["redeliver_after_ms"] = 3000
    document["pipeline"] = {**document.get("pipeline", {}), "session_timeout_s": 4}
    # Billing periods as a user in New Zealand with mid-month invoices has them.
    document["billing"] = {**document.get("billing", {}), "timezone": "Pacific/Auckland", "anchor_day": 15}
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    return config_path, load_config(config_path)


def _start_clients(stack: RunningStack, config_path: Path, served: dict[str, Ledger]) -> list[Client]:
    """Two clients per customer, one of them streaming, sending until stopped."""
    base_url = stack.wait_for(r"quotameter ready on (http://\S+/v1)").group(1)
    stack.wait_for(r"Ctrl-C stops everything")
    keys = {c: _cli(config_path, "keys", "create", "--customer", c, "--tier", tier).strip() for c, tier in CUSTOMERS.items()}
    time.sleep(1.5)  # Redis's append-only file is synced every second: the keys survive its SIGKILL
    lock = threading.Lock()
    clients = [Client(base_url, keys[customer], served[customer], lock, stream=n in (1, 2), n=n)
               for n, customer in enumerate(list(CUSTOMERS) * 2)]
    for client in clients:
        client.start()
    return clients


def _stop(stack: RunningStack, clients: list[Client]) -> None:
    for client in clients:
        client.stop.set()
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGINT)
        try:
            stack.proc.wait(90)
        except subprocess.TimeoutExpired:
            for pid in [stack.proc.pid, *descendants(stack.proc.pid)]:
                os.kill(pid, signal.SIGKILL)


def test_sigkill_of_each_part_then_of_everything_bills_every_served_token_once(tmp_path: Path) -> None:
    config_path, config = _chaos_config(tmp_path)
    data_dir = tmp_path / "var"
    began = time.monotonic()

    stack = start_stack(config_path, data_dir)
    clients: list[Client] = []
    served = {customer: Ledger() for customer in CUSTOMERS}
    try:
        clients = _start_clients(stack, config_path, served)

        for role in KILL_ORDER:
            time.sleep(3)
            pid = _find(stack, role)
            assert pid is not None, f"no {role} process under the stack\n{stack.output}"
            os.kill(pid, signal.SIGKILL)
            replacement = wait_for(lambda: (p := _find(stack, role)) not in (None, pid) and p, 60, f"{role} restarted")
            print(f"{time.monotonic() - began:5.1f}s  killed {role} (pid {pid}); restarted as pid {replacement}")
            wait_for(lambda: _get_json(f"http://{config.shim.host}:{config.shim.port}/healthz").get("status") == "ok", 60,
                  "the shim to answer again")

        # Everything at once: the launcher and every process below it.
        time.sleep(3)
        tree = [stack.proc.pid, *descendants(stack.proc.pid)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stack.proc.wait(10)
        print(f"{time.monotonic() - began:5.1f}s  killed the whole tree ({len(tree)} processes)")
        time.sleep(1)
        stack = start_stack(config_path, data_dir)
        stack.wait_for(r"quotameter ready on ")
        print(f"{time.monotonic() - began:5.1f}s  stack up again")
        time.sleep(4)  # traffic on the new stack too
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(30)

        _billed_as_served(config, config_path, clients, served, SHIM_DEATHS)
        print(f"exact after 5 single kills and one of the whole tree; {time.monotonic() - began:.0f}s")
    finally:
        _stop(stack, clients)


def test_ctrl_c_in_the_middle_of_traffic_then_a_restart_bills_every_served_token_once(tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it, to ``quotameter up`` while clients send;
    then ``up`` again on the same data directory. A stop that is asked for
    finishes what it answers: nothing served is lost, nothing unserved billed."""
    config_path, config = _chaos_config(tmp_path)
    data_dir = tmp_path / "var"
    stack = start_stack(config_path, data_dir)
    clients: list[Client] = []
    served = {customer: Ledger() for customer in CUSTOMERS}
    try:
        clients = _start_clients(stack, config_path, served)
        time.sleep(4)
        before = sum(s.requests for s in served.values())
        stack.proc.send_signal(signal.SIGINT)
        assert stack.proc.wait(90) == 0, stack.output
        stack.wait_for("quotameter: stopped everything")
        assert before > 0, "nothing was served before Ctrl-C"
        stack = start_stack(config_path, data_dir)
        stack.wait_for(r"quotameter ready on ")
        time.sleep(4)  # the same clients, on the stack again
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(30)
        after = sum(s.requests for s in served.values())
        assert after > before, "no request was served after the restart"
        print(f"served {before} before Ctrl-C, {after - before} after; "
              f"failed meanwhile: {sum(s.outcomes['failed'] for s in served.values())}")
        _billed_as_served(config, config_path, clients, served, shim_deaths=0)
    finally:
        _stop(stack, clients)
