"""Bulk import benchmark (issue 11): ``optimizely-odp-ext import`` against a plain ``send_odp_event`` loop.

Run from the repository root (not part of ``make test``; about two minutes with the defaults)::

    .venv/bin/python benchmarks/import_bench.py                      # 100,000 lines x 3, then RSS for 1,000,000
    .venv/bin/python benchmarks/import_bench.py --lines 20000 --rss-lines 0 --repeats 1   # quick look

One ``FakeOdpServer`` on 127.0.0.1 runs in this process (it counts events and distinct ids instead of
keeping them, so a million events do not fill this process). Each run is a fresh subprocess:

* **import**: ``python -m optimizely_odp_ext import --host URL --quiet FILE`` with its defaults (queue
  10,000 with ``overflow="block"``, batch 100, 4 requests in flight); events/s = distinct events the
  server received / the subprocess' wall time, interpreter start, hashing the file and the final flush
  included;
* **loop** (and, for information, the same with ``overflow="block"``): a plain Optimizely client with
  ``optimizely_odp_ext.install(client)`` (every default: queue 10,000, ``overflow="drop_newest"``) calling
  ``client.send_odp_event`` for each line of the same file (``json.loads`` then the call), then
  ``flush_odp_events()``; the same events/s, and what was dropped.

RSS: the import of ``--rss-lines`` lines runs in a subprocess that calls ``optimizely_odp_ext.cli.main``
itself, so it can read its own RSS before (all modules loaded) and its peak (``VmHWM``) after.

The figures go to stdout and into ``benchmarks/RESULTS.md`` between the ``import-benchmark`` markers
(the rest of that file is written by ``run.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Set

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from optimizely_odp_ext.testing import FakeOdpServer  # noqa: E402

API_KEY = "bench-import-key"
TARGET = 15_000  # events/s (issue 11)
RSS_LIMIT_MIB = 100  # RSS growth for 1,000,000 lines (issue 11)
BEGIN, END = "<!-- import-benchmark:begin -->", "<!-- import-benchmark:end -->"

_LOOP = """
import json, sys, time
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
client = optimizely.Optimizely(datafile(sys.argv[1], sys.argv[2]))
optimizely_odp_ext.install(client, **json.loads(sys.argv[4]))
started = time.monotonic()
with open(sys.argv[3], "rb") as f:
    for raw in f:
        e = json.loads(raw)
        client.send_odp_event(e["action"], e["identifiers"], e.get("type"), e.get("data"))
sent = time.monotonic() - started
client.flush_odp_events(600)
stats = client.odp_event_stats()
client.close()
print(json.dumps({"send_loop_s": sent, "dropped": stats["dropped"]}))
"""

_RSS = """
import json, sys
import optimizely_odp_ext.cli as cli
def kib(field):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1])
before = kib("VmRSS")
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "rss_before_kib": before, "peak_kib": kib("VmHWM")}))
"""


class CountingServer(FakeOdpServer):
    """A FakeOdpServer that counts what it accepts (events, distinct ids) instead of keeping it."""

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self.count = 0
        self.ids: Set[str] = set()
        self.request_count = 0

    def _record(self, request: Any, events: Optional[List[Dict[str, Any]]], api_key: str) -> None:
        with self._cond:
            self.request_count += 1
            if events:
                self.count += len(events)
                self.ids.update(e["data"]["idempotence_id"] for e in events)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.count, self.ids, self.request_count = 0, set(), 0


def write_events(path: str, lines: int) -> None:
    """Events like a warehouse export: two identifiers and four data fields, no idempotence_id."""
    with open(path, "w", encoding="utf-8") as f:
        for n in range(1, lines + 1):
            f.write(json.dumps({"action": "purchased", "identifiers": {"fs_user_id": f"user-{n}",
                                                                        "email": f"user{n}@example.com"},
                                "data": {"order": f"o-{n}", "price": (n % 997) * 0.25, "qty": n % 5 + 1,
                                         "gift": n % 7 == 0}}) + "\n")


def run_import(server: CountingServer, path: str, env: Dict[str, str]) -> Dict[str, Any]:
    server.clear()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "optimizely_odp_ext", "import", "--host", server.url, "--quiet",
                           "--no-resume", path], env=env, capture_output=True, timeout=1200, check=False)
    seconds = time.monotonic() - started
    summary = proc.stdout.decode().strip()
    reported = re.search(r"([\d,]+) events/s", summary)
    return {"code": proc.returncode, "seconds": seconds, "received": server.count, "distinct": len(server.ids),
            "requests": server.request_count, "events_per_s": len(server.ids) / seconds,
            "cli_events_per_s": float(reported.group(1).replace(",", "")) if reported else None,
            "summary": summary, "stderr": proc.stderr.decode()[-500:]}


def run_loop(server: CountingServer, path: str, env: Dict[str, str], **options: Any) -> Dict[str, Any]:
    server.clear()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LOOP, server.url, API_KEY, path, json.dumps(options)], env=env,
                          capture_output=True, timeout=1200, check=False)
    seconds = time.monotonic() - started
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1]) if proc.returncode == 0 else {}
    return {"code": proc.returncode, "seconds": seconds, "received": server.count, "distinct": len(server.ids),
            "events_per_s": len(server.ids) / seconds, "dropped": out.get("dropped"),
            "send_loop_s": out.get("send_loop_s"), "stderr": proc.stderr.decode()[-500:]}


def run_rss(server: CountingServer, path: str, env: Dict[str, str]) -> Dict[str, Any]:
    server.clear()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RSS, "import", "--host", server.url, "--quiet", "--no-resume",
                           path], env=env, capture_output=True, timeout=3600, check=False)
    seconds = time.monotonic() - started
    lines = proc.stdout.decode().strip().splitlines()
    out = json.loads(lines[-1])
    return {"code": out["code"], "seconds": seconds, "distinct": len(server.ids), "received": server.count,
            "events_per_s": len(server.ids) / seconds, "rss_before_mib": out["rss_before_kib"] / 1024,
            "peak_mib": out["peak_kib"] / 1024, "growth_mib": (out["peak_kib"] - out["rss_before_kib"]) / 1024,
            "summary": lines[0] if len(lines) > 1 else ""}


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def joined(runs: List[Dict[str, Any]], key: str, fmt: str) -> str:
    return ", ".join(fmt.format(r[key]) for r in runs)


def report(args: argparse.Namespace, runs: Dict[str, List[Dict[str, Any]]], rss: Optional[Dict[str, Any]],
           load_before: str) -> str:
    imports, loops, blocking = runs["import"], runs["loop"], runs["block"]
    imp = statistics.median(r["events_per_s"] for r in imports)
    loop = statistics.median(r["events_per_s"] for r in loops)
    block = statistics.median(r["events_per_s"] for r in blocking)
    dropped = [sum((r["dropped"] or {}).values()) for r in loops]
    block_dropped = [sum((r["dropped"] or {}).values()) for r in blocking]
    out = [
        BEGIN,
        "## Bulk import (issue 11): `optimizely-odp-ext import` vs a plain `send_odp_event` loop",
        "",
        "Generated by `benchmarks/import_bench.py`; do not edit by hand.",
        "",
        f"Command: `.venv/bin/python benchmarks/import_bench.py --lines {args.lines} --repeats {args.repeats} "
        f"--rss-lines {args.rss_lines}`; {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average before / after: "
        f"{load_before} / {load_average()}.",
        "",
        f"A JSON Lines file of {args.lines:,} events (two identifiers, four data fields) sent to one "
        "`FakeOdpServer` on 127.0.0.1 in the benchmark's process; each run a fresh subprocess; events/s = "
        "distinct events the server received / the subprocess' wall time (interpreter start, reading and "
        f"hashing the file and the final flush included); medians over {args.repeats} run(s).",
        "",
        "| target | events/s | distinct events received (per run) | dropped (per run) | seconds (per run) |",
        "| --- | --- | --- | --- | --- |",
        f"| `import` (defaults: queue 10,000 with overflow \"block\", batch 100, 4 in flight) | {imp:,.0f} | "
        f"{joined(imports, 'distinct', '{:,}')} | 0 | {joined(imports, 'seconds', '{:.2f}')} |",
        f"| plain loop: `install(client)` defaults, `json.loads` + `send_odp_event` per line, then "
        f"`flush_odp_events()` | {loop:,.0f} | {joined(loops, 'distinct', '{:,}')} | "
        f"{', '.join(format(d, ',') for d in dropped)} | {joined(loops, 'seconds', '{:.2f}')} |",
        f"| for information: the same loop with `install(client, overflow=\"block\")` | {block:,.0f} | "
        f"{joined(blocking, 'distinct', '{:,}')} | {', '.join(format(d, ',') for d in block_dropped)} | "
        f"{joined(blocking, 'seconds', '{:.2f}')} |",
        "",
        f"Target: import >= {TARGET:,} events/s: **{'MET' if imp >= TARGET else 'NOT MET'}** ({imp:,.0f}); "
        f"import / loop = {imp / loop:.2f}x. The loop's drops are its default queue (10,000, "
        "`drop_newest`) overflowing in a tight loop, by design; `import` waits for room instead "
        "(`overflow=\"block\"`).",
    ]
    if rss is not None:
        ok = rss["growth_mib"] < RSS_LIMIT_MIB and rss["distinct"] == args.rss_lines
        out += [
            "",
            f"Memory: `import` of {args.rss_lines:,} lines in a subprocess that calls `optimizely_odp_ext.cli.main` "
            "itself: RSS once every module is loaded, then peak RSS (`VmHWM`) when it returns.",
            "",
            "| lines | distinct events received | RSS before (MiB) | peak RSS (MiB) | growth (MiB) | seconds "
            "| events/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {args.rss_lines:,} | {rss['distinct']:,} | {rss['rss_before_mib']:.1f} | {rss['peak_mib']:.1f} | "
            f"{rss['growth_mib']:.1f} | {rss['seconds']:.1f} | {rss['events_per_s']:,.0f} |",
            "",
            f"Target: RSS growth < {RSS_LIMIT_MIB} MB with every line delivered: **{'MET' if ok else 'NOT MET'}**.",
        ]
    out.append(END)
    return "\n".join(out) + "\n"


def write_results(section: str, path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000, help="lines per speed run")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per target")
    parser.add_argument("--rss-lines", type=int, default=1_000_000, help="lines for the RSS run (0: skip it)")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"), help="results file to update")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["OPTIMIZELY_ODP_API_KEY"] = API_KEY
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="odp-import-bench-") as tmp, CountingServer(API_KEY) as server:
        path = os.path.join(tmp, "events.jsonl")
        write_events(path, args.lines)
        imports: List[Dict[str, Any]] = []
        loops: List[Dict[str, Any]] = []
        blocking: List[Dict[str, Any]] = []
        for i in range(args.repeats):  # interleaved, so all see the same machine load
            imports.append(run_import(server, path, env))
            loops.append(run_loop(server, path, env))
            blocking.append(run_loop(server, path, env, overflow="block"))
            print(f"run {i + 1}: import {imports[-1]['events_per_s']:,.0f} events/s "
                  f"({imports[-1]['distinct']:,} received), loop {loops[-1]['events_per_s']:,.0f} events/s "
                  f"({loops[-1]['distinct']:,} received), blocking loop {blocking[-1]['events_per_s']:,.0f} "
                  f"events/s ({blocking[-1]['distinct']:,} received)", flush=True)
        failed = [r for r in imports + loops + blocking if r["code"] != 0]
        rss = None
        if args.rss_lines:
            big = os.path.join(tmp, "big.jsonl")
            write_events(big, args.rss_lines)
            rss = run_rss(server, big, env)
            print(f"rss: {args.rss_lines:,} lines, growth {rss['growth_mib']:.1f} MiB, "
                  f"{rss['events_per_s']:,.0f} events/s", flush=True)
    section = report(args, {"import": imports, "loop": loops, "block": blocking}, rss, load_before)
    print(section)
    write_results(section, args.output)
    for r in failed:
        print(f"a run failed (exit {r['code']}): {r['stderr']}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    threading.current_thread().name = "import-bench"
    sys.exit(main())
