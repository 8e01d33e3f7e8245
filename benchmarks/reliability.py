"""Reliability of `tokenmill serve` under load, poisoned requests, bad input, cut connections and core faults.

Run:  python benchmarks/reliability.py            (~2 min on 2 cores)
      python benchmarks/reliability.py --quick    (~40 s)

Starts `tokenmill serve` (default model, --dtype float32) on a free port and measures (issue 17):
  load    N client threads send greedy requests (completions and chat, streaming or not); each prompt carries a
          number and asks the model to repeat it. The expected output of each number is first taken from
          sequential requests. Counted: sent / lost (no response, or a stream without [DONE]) / mixed up (output
          differs from the sequential one; "foreign" when it holds another request's number) / 4xx / 5xx.
  poison  the same load with ~10% poisoned requests (temperature, top_p or repetition_penalty 1e-300,
          repetition_penalty 1e308): every other request must still finish with its expected output.
  fuzz    ~100 bad inputs (lone surrogates, n and prompt counts over the limits, huge stop lists, a 20 MB body,
          non-finite numbers written as JSON tokens, wrong types): each must be a 4xx naming the field in
          `error.param`, and a good request on the same httpx.Client (keep-alive connection) must then succeed.
  cut     streaming requests closed after 0-4 chunks; then one small request, and /metrics must show
          kv_cache_usage_perc 0 and num_requests_running 0 (no leaked KV blocks).
  faults  SIGSTOP of the engine core -> seconds until /health is non-200; SIGCONT -> seconds until 200 again;
          kill -9 of the core -> seconds until the server process exits, and its exit code.
Prints a table and writes a JSON report to --out (benchmarks/results/reliability/).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from reliability_cases import run_fuzz  # benchmarks/ is sys.path[0] when run as a script
from tqdm import tqdm

from tokenmill.bench.peers import ServerProcess, free_port

MAX_TOKENS = 12
POISONS = [("temperature", 1e-300), ("top_p", 1e-300), ("repetition_penalty", 1e-300),
           ("repetition_penalty", 1e308)]


# --- server ---------------------------------------------------------------------------------------------------

class Server(ServerProcess):
    """`tokenmill serve` on the default model in float32, with what this benchmark reads of it."""

    def __init__(self, log_path: Path, extra: list[str]) -> None:
        port = free_port()
        super().__init__("tokenmill", [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port),
                                       "--dtype", "float32", *extra], port, log_path, env={"PYTHONUNBUFFERED": "1"})
        self.url = self.base_url
        self.proc = None

    def log(self) -> str:
        return self.log_tail(10**9)

    def start_and_time(self, timeout: float = 300) -> float:
        """Start it and return the seconds until /health answered 200."""
        start = time.monotonic()
        self.start(timeout)
        self.proc = self.process
        return time.monotonic() - start

    def core_pid(self) -> int:
        return int(re.search(r"engine core running in process (\d+)", self.log()).group(1))

    def metrics(self) -> dict[str, float]:
        """'name{labels}' -> value for every tokenmill sample (model_name label left out)."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("tokenmill:"):
                key, value = line.rsplit(" ", 1)
                out[re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "").replace(",}", "}")] = float(value)
        return out


# --- load and poison ------------------------------------------------------------------------------------------

def request_for(number: int, stream: bool) -> tuple[str, dict[str, Any]]:
    """Even numbers go to completions, odd ones to chat, so each number has one expected text."""
    if number % 2 == 0:
        return "/v1/completions", {"prompt": f"Repeat the number {number} exactly.\nNumber: {number}\nAgain:",
                                   "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    content = f"{number}\nRepeat the number above, digits only."
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                    "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


def send(client: httpx.Client, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request -> {"status", "text", "outcome"}: ok, lost, 4xx, 5xx or error_event (an error inside a stream)."""
    chat = path.endswith("chat/completions")
    try:
        if not body.get("stream"):
            r = client.post(url + path, json=body, timeout=180)
            if r.status_code != 200:
                return {"status": r.status_code, "outcome": f"{r.status_code // 100}xx", "text": r.text[:300]}
            choice = r.json()["choices"][0]
            return {"status": 200, "outcome": "ok", "text": choice["message"]["content"] if chat else choice["text"]}
        with client.stream("POST", url + path, json=body, timeout=180) as r:
            if r.status_code != 200:
                r.read()
                return {"status": r.status_code, "outcome": f"{r.status_code // 100}xx", "text": r.text[:300]}
            text, done, error = "", False, None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    text += (choice["delta"].get("content") or "") if chat else choice["text"]
            if error is not None:
                return {"status": 200, "outcome": "error_event", "text": json.dumps(error)[:300]}
            return {"status": 200, "outcome": "ok" if done else "lost", "text": text}
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return {"status": None, "outcome": "lost", "text": f"{type(exc).__name__}: {exc}"[:300]}


def references(url: str, numbers: list[int]) -> dict[int, str]:
    out = {}
    with httpx.Client() as client:
        for number in tqdm(numbers, desc="sequential references", unit="req"):
            path, body = request_for(number, stream=False)
            result = send(client, url, path, body)
            if result["outcome"] != "ok":
                sys.exit(f"a sequential reference request failed: {result}")
            out[number] = result["text"]
    return out


def run_load(url: str, refs: dict[int, str], total: int, clients: int, poison_rate: float,
             rng: random.Random, desc: str) -> dict[str, Any]:
    numbers = list(refs)
    plan = []
    for i in range(total):
        number, stream = numbers[i % len(numbers)], rng.random() < 0.5
        path, body = request_for(number, stream)
        poison = rng.choice(POISONS) if rng.random() < poison_rate else None
        if poison is not None:  # top_p and penalties poisoned under random sampling, where they act
            body.update({"temperature": 1.0, poison[0]: poison[1]})
        plan.append((number, path, body, poison))
    local = threading.local()
    bar = tqdm(total=total, desc=desc, unit="req")

    def one(item: tuple[int, str, dict[str, Any], Any]) -> dict[str, Any]:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        number, path, body, poison = item
        result = send(local.client, url, path, body)
        bar.update()
        result.update(number=number, stream=body["stream"], poison=f"{poison[0]}={poison[1]:g}" if poison else None)
        if result["outcome"] == "ok" and poison is None and result["text"] != refs[number]:
            result["outcome"] = "mixed_up"
            result["foreign"] = any(str(n) in result["text"] for n in numbers if n != number)
        return result

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, plan))
    bar.close()
    seconds = time.monotonic() - start
    clean = [r for r in results if r["poison"] is None]
    poisoned = [r for r in results if r["poison"] is not None]
    return {
        "sent": total, "clients": clients, "seconds": round(seconds, 1),
        "clean_sent": len(clean),
        "clean_outcomes": dict(Counter(r["outcome"] for r in clean)),
        "lost": sum(r["outcome"] == "lost" for r in clean),
        "mixed_up": sum(r["outcome"] == "mixed_up" for r in clean),
        "foreign_number": sum(bool(r.get("foreign")) for r in clean),
        "status_5xx": sum(r["outcome"] in ("5xx", "error_event") for r in results),
        "clean_failed": sum(r["outcome"] != "ok" for r in clean),
        "poisoned_sent": len(poisoned),
        "poisoned_outcomes": dict(Counter(f"{r['poison']}: {r['outcome'] if r['outcome'] != '4xx' else r['status']}"
                                          for r in poisoned)),
        "examples_not_ok": [r for r in clean if r["outcome"] != "ok"][:5],
    }


# --- cut connections ------------------------------------------------------------------------------------------

def run_cuts(server: Server, count: int, clients: int) -> dict[str, Any]:
    abort_key = 'tokenmill:request_success_total{finished_reason="abort"}'
    before = server.metrics()
    rng = random.Random(7)
    bar = tqdm(total=count, desc="cut connections", unit="req")

    def one(i: int) -> int:
        chunks_wanted = rng.randint(0, 4)
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "temperature": 0}
        seen = 0
        with httpx.Client(timeout=120) as client, client.stream("POST", server.url + "/v1/completions",
                                                                json=body) as r:
            for line in r.iter_lines():
                if seen >= chunks_wanted:
                    break
                seen += line.startswith("data: {")
        bar.update()
        return seen

    with ThreadPoolExecutor(clients) as pool:
        chunks = list(pool.map(one, range(count)))
    bar.close()
    deadline = time.monotonic() + 30
    while server.metrics().get("tokenmill:num_requests_running", 1) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    small = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    time.sleep(0.5)
    after = server.metrics()
    usage = after.get("tokenmill:kv_cache_usage_perc")
    return {
        "cut": count, "chunks_before_cut": dict(Counter(chunks)), "small_request_after": small.status_code,
        "kv_cache_usage_perc_after": usage,
        "num_requests_running_after": after.get("tokenmill:num_requests_running"),
        "num_requests_waiting_after": after.get("tokenmill:num_requests_waiting"),
        # /metrics gives the used fraction only: 0.0 is 0 leaked blocks; anything else is a leak of unknown size
        "leaked_blocks": 0 if usage == 0 else None,
        "abort_counted": after.get(abort_key, 0) - before.get(abort_key, 0),
    }


# --- faults ---------------------------------------------------------------------------------------------------

def _seconds_until(predicate, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return round(time.monotonic() - start, 2)
        time.sleep(0.05)
    return None


def _health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=1).status_code
    except httpx.HTTPError:
        return None


def run_faults(server: Server) -> dict[str, Any]:
    pid = server.core_pid()
    out: dict[str, Any] = {"core_pid": pid}
    os.kill(pid, signal.SIGSTOP)
    try:
        out["sigstop_to_health_non_200_s"] = _seconds_until(lambda: _health(server.url) != 200, 30)
        out["health_while_stopped"] = _health(server.url)
    finally:
        os.kill(pid, signal.SIGCONT)
    out["sigcont_to_health_200_s"] = _seconds_until(lambda: _health(server.url) == 200, 30)
    after = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    out["request_after_sigcont"] = after.status_code
    out["traceback_in_log_before_kill"] = "Traceback" in server.log()
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    try:
        code = server.proc.wait(60)
        out["kill9_to_server_exit_s"] = round(time.monotonic() - start, 2)
        out["server_exit_code"] = code
    except subprocess.TimeoutExpired:
        out["kill9_to_server_exit_s"] = None
        out["server_exit_code"] = None
    return out


# --- main -----------------------------------------------------------------------------------------------------

def cpu_flags() -> str:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return " ".join(sorted(w for w in words if w == "avx2" or w.startswith("avx512")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (~40 s)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=None, help="per load phase (default 300; --quick 64)")
    parser.add_argument("--numbers", type=int, default=None, help="distinct prompts (default 48; --quick 16)")
    parser.add_argument("--cuts", type=int, default=None, help="cut streams (default 50; --quick 16)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reliability")
    parser.add_argument("--log", type=Path, default=None, help="the server's log file (default: a temporary one)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `tokenmill serve` argument")
    args = parser.parse_args()
    requests = args.requests or (64 if args.quick else 300)
    numbers_n = args.numbers or (16 if args.quick else 48)
    cuts = args.cuts or (16 if args.quick else 50)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(17)
    numbers = rng.sample(range(1_000_000, 9_999_999), numbers_n)

    log_path = args.log or Path(tempfile.mkdtemp(prefix="tokenmill-reliability-")) / "serve.log"
    server = Server(log_path, args.serve_arg)
    report: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "serve_command": " ".join(server.command[1:]), "cpu_flags": cpu_flags(),
                              "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    wall = time.monotonic()
    try:
        report["ready_s"] = round(server.start_and_time(), 1)
        refs = references(server.url, numbers)
        report["references"] = {str(n): t for n, t in refs.items()}
        report["references_holding_their_number"] = sum(str(n) in t for n, t in refs.items())
        report["load"] = run_load(server.url, refs, requests, args.clients, 0.0, rng, "load")
        report["poison"] = run_load(server.url, refs, requests, args.clients, 0.1, rng, "load + poison")
        report["fuzz"] = run_fuzz(server.url)
        report["cut"] = run_cuts(server, cuts, 4)
        report["faults"] = run_faults(server)
    finally:
        server.stop()
        log = server.log()
        report["server_log_tracebacks"] = log.count("Traceback")
        report["server_log_errors"] = [line for line in log.splitlines()
                                       if " ERROR " in line or "Traceback" in line][:20]
        report["wall_s"] = round(time.monotonic() - wall, 1)
        path = args.out / ("report_quick.json" if args.quick else "report.json")
        path.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"report: {path}; server log: {log_path}")


def print_table(r: dict[str, Any]) -> None:
    print(f"\ncpu flags: {r['cpu_flags']}; ready in {r.get('ready_s')} s; whole run {r['wall_s']} s; "
          f"{r.get('references_holding_their_number')}/{len(r.get('references', {}))} "
          "sequential outputs hold their number")
    print(f"{'phase':<8} {'sent':>5} {'lost':>5} {'mixed up':>9} {'5xx':>4}  notes")
    for phase in ("load", "poison"):
        p = r.get(phase)
        if p:
            note = f"{p['clients']} clients, {p['seconds']} s; clean requests not ok: {p['clean_failed']}"
            if phase == "poison":
                note += f"; {p['poisoned_sent']} poisoned: {p['poisoned_outcomes']}"
            print(f"{phase:<8} {p['sent']:>5} {p['lost']:>5} {p['mixed_up']:>9} {p['status_5xx']:>4}  {note}")
    if f := r.get("fuzz"):
        print(f"{'fuzz':<8} {f['cases']:>5} {f['no_response']:>5} {'-':>9} {f['status_5xx']:>4}  "
              f"4xx {f['four_xx']}/{f['cases']}, error.param right {f['param_ok']}/{f['with_expected_param']}, "
              f"follow-up ok {f['follow_up_ok']}/{f['cases']} (same connection {f['follow_up_same_connection']})")
        for row in f["not_ok"]:
            print(f"         not ok: {row['case']}: {row['status']} param={row['param']!r} (want "
                  f"{row['expected_param']!r}) follow-up {row['follow_up']}: {row['message'][:90]}")
    if c := r.get("cut"):
        print(f"{'cut':<8} {c['cut']:>5} {'-':>5} {'-':>9} {'-':>4}  after: kv_cache_usage_perc "
              f"{c['kv_cache_usage_perc_after']}, running {c['num_requests_running_after']}, leaked blocks "
              f"{c['leaked_blocks']}, aborts counted {c['abort_counted']}")
    if x := r.get("faults"):
        print(f"faults: SIGSTOP -> /health non-200 in {x['sigstop_to_health_non_200_s']} s "
              f"({x['health_while_stopped']}); SIGCONT -> 200 in {x['sigcont_to_health_200_s']} s; "
              f"kill -9 -> server exit in {x['kill9_to_server_exit_s']} s, code {x['server_exit_code']}")
    print(f"server log: {r['server_log_tracebacks']} tracebacks")


if __name__ == "__main__":
    main()
