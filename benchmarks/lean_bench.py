"""The lean-path benchmark (issue 19): ours against the floor and the SDK, same run, as ratios.

Run from the repository root (not part of the test suite; about 5 minutes)::

    .venv/bin/python benchmarks/lean_bench.py                 # all three sections, 3 runs each
    .venv/bin/python benchmarks/lean_bench.py --repeats 1 --events 20000 --sweep-events 5000   # quick

One ``FakeOdpServer`` on 127.0.0.1 in this process; every run is a fresh ``bench_worker.py`` subprocess
(``lean_worker.py`` holds the floor and the raw stacks), interleaved target by target:

1. **end to end**: one thread sends ``--events`` (50,000) then ours flushes. ``floor`` = issue 19's floor
   (dicts, ``uuid4`` ids, ``json.dumps`` per batch of 100, ``http.client`` over one keep-alive connection,
   no validation); ``ours`` = ``install(client, queue_capacity=60_000)`` once through ``Urllib3Transport``
   and once through ``RequestsTransport``; ``sdk`` = the SDK's own ``send_odp_event`` (queue 1,000: most
   of the burst is dropped by design, so its figures are per *delivered* event). CPU per event = the
   worker's process CPU time (every thread) from the first send until delivered and closed, over the
   events delivered (counted from the server's records); events/s = delivered / (first send -> last
   event recorded by the server).
2. **raw stacks**: pre-encoded batches of 100 POSTed over one keep-alive connection by ``http.client``,
   ``urllib3``, ``requests`` and our two transports: client CPU per event of the HTTP layer alone.
3. **latency sweep**: the server adds 0, 20, 50 and 150 ms to every request (``set_latency``);
   ``--sweep-events`` (10,000) for the floor, ours with the defaults, ours as issue 19 found it
   (requests, 100 events per request, 4 in flight: ``max_batch_size=100, max_in_flight=4``), and ours
   with ``max_in_flight=4`` (what growing batches alone give).

The section between the ``lean-benchmark`` markers of ``RESULTS.md`` is rewritten; the rest is
``run.py``'s and ``import_bench.py``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench_harness import API_KEY, HERE, FakeOdpServer, Runner, Settings, events_per_second, run_one
from bench_tables import load_average

BEGIN, END = "<!-- lean-benchmark:begin -->", "<!-- lean-benchmark:end -->"
OPTIONS = {"queue_capacity": 60_000}
# label -> (worker target, extra config)
VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "floor": ("floor_http", {}),
    "ours (urllib3)": ("ours", {"transport": "urllib3"}),
    "ours (requests)": ("ours", {"transport": "requests"}),
    "sdk": ("sdk", {}),
    # Sweep only. Where issue 19 started: requests, every request 100 events, 4 in flight.
    "before (requests, 100 per request, 4 in flight)": (
        "ours", {"transport": "requests", "options": {"max_batch_size": 100, "max_in_flight": 4}}),
    # Batches growing toward 500 alone, without more requests in flight.
    "ours, max_in_flight=4": ("ours", {"transport": "urllib3", "options": {"max_in_flight": 4}}),
}
E2E = ("floor", "ours (urllib3)", "ours (requests)", "sdk")
STACKS = ("http.client", "urllib3", "requests", "Urllib3Transport", "RequestsTransport")
SWEEP = ("floor", "ours (urllib3)", "before (requests, 100 per request, 4 in flight)", "ours, max_in_flight=4")
LATENCIES = (0.0, 0.02, 0.05, 0.15)


def figures(result: Dict[str, Any]) -> Dict[str, Any]:
    """CPU µs per delivered event, events/s, delivered, lost and the User-Agent the server saw."""
    if not result.get("ok"):
        return {"error": result.get("error")}
    delivered = result["server"]["delivered"]
    cpu = (result.get("final") or {}).get("cpu_seconds")
    if cpu is None:
        cpu = result["sent"].get("cpu_after_send_and_flush")
    return {"cpu_us": cpu / delivered * 1e6 if delivered and cpu is not None else None,
            "events_s": events_per_second(result), "delivered": delivered, "lost": result["server"]["lost"],
            "connections": result["server"]["connections"], "agents": result["server"].get("agents", [])}


class Lean(Runner):
    def one(self, label: str, target: str, extra: Dict[str, Any], latency: float, events: int) -> Dict[str, Any]:
        extra = dict(extra)
        cfg = self.cfg(target, "throughput", {**OPTIONS, **extra.pop("options", {})}, events=events,
                       deadline=self.settings.deliver_deadline, **extra)
        started = time.monotonic()
        result = run_one(self.server, cfg, latency, self.settings)
        out = figures(result)
        self.say(f"  {label}, {latency * 1000:.0f} ms: {describe(out)} ({time.monotonic() - started:.1f} s)")
        return out

    def end_to_end(self, events: int) -> Dict[str, List[Dict[str, Any]]]:
        runs: Dict[str, List[Dict[str, Any]]] = {label: [] for label in E2E}
        for index in range(self.settings.repeats):
            self.say(f"end to end, run {index + 1}/{self.settings.repeats}")
            for label in E2E:
                target, extra = VARIANTS[label]
                runs[label].append(self.one(label, target, extra, 0.0, events))
        return runs

    def stacks(self, events: int) -> Dict[str, List[Dict[str, Any]]]:
        runs: Dict[str, List[Dict[str, Any]]] = {stack: [] for stack in STACKS}
        for index in range(self.settings.repeats):
            self.say(f"raw stacks, run {index + 1}/{self.settings.repeats}")
            for stack in STACKS:
                runs[stack].append(self.one(stack, "stack", {"stack": stack}, 0.0, events))
        return runs

    def sweep(self, events: int, latencies: Sequence[float]) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {f"{ms:g}": {label: [] for label in SWEEP}
                                                             for ms in (x * 1000 for x in latencies)}
        for index in range(self.settings.repeats):
            self.say(f"latency sweep, run {index + 1}/{self.settings.repeats}")
            for latency in latencies:
                for label in SWEEP:
                    target, extra = VARIANTS[label]
                    runs[f"{latency * 1000:g}"][label].append(self.one(label, target, extra, latency, events))
        return runs


def describe(out: Dict[str, Any]) -> str:
    if "error" in out:
        return f"ERROR {out['error']}"
    cpu = "-" if out["cpu_us"] is None else f"{out['cpu_us']:.1f} us/event"
    rate = "-" if out["events_s"] is None else f"{out['events_s']:,.0f} events/s"
    return f"{cpu}, {rate}, delivered {out['delivered']}, lost {out['lost']}, connections {out['connections']}"


def median(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def spread(runs: List[Dict[str, Any]], key: str, fmt: str) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return format(statistics.median(values), fmt) + ("" if len(values) == 1 else
                                                     f" ({format(low, fmt)} to {format(high, fmt)})")


def ratio(value: Optional[float], base: Optional[float]) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def table(runs: Dict[str, List[Dict[str, Any]]], base: str) -> List[str]:
    lines = [f"| | CPU per delivered event (µs) | ÷ {base} | events/s | ÷ {base} | delivered / lost (all runs) |",
             "| --- | --- | --- | --- | --- | --- |"]
    cpu0, rate0 = median(runs[base], "cpu_us"), median(runs[base], "events_s")
    for label, group in runs.items():
        delivered = sum(r.get("delivered", 0) for r in group)
        lost = sum(r.get("lost", 0) for r in group)
        lines.append(f"| {label} | {spread(group, 'cpu_us', '.1f')} | {ratio(median(group, 'cpu_us'), cpu0)} | "
                     f"{spread(group, 'events_s', ',.0f')} | {ratio(median(group, 'events_s'), rate0)} | "
                     f"{delivered:,} / {lost:,} |")
    return lines


def report(args: argparse.Namespace, command: str, results: Dict[str, Any], loads: Tuple[str, str],
           elapsed: float) -> str:
    out = [BEGIN, "## The lean path: ours against the floor (issue 19)", "",
           f"Generated by `benchmarks/lean_bench.py` ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, "
           f"{elapsed:.0f} s; load average before / after {loads[0]} / {loads[1]} on "
           f"{os.cpu_count()} CPUs). Command:", "", f"    {command}", "",
           f"{args.repeats} run(s) per row, interleaved; medians with (min to max). CPU = the worker process's "
           "CPU time (every thread), from the first send until delivered and closed, per event the server "
           "recorded; events/s = delivered / (first send → last event recorded). The server runs in the "
           "parent process, so its CPU is not counted. See the script's docstring for each row.", ""]
    if "end_to_end" in results:
        out += [f"### End to end: 1 thread sends {args.events:,} events, then a flush (no added latency)", "",
                *table(results["end_to_end"], "floor"), "",
                "ours = `install(client, queue_capacity=60_000)`, all else default (batches of 100 growing toward "
                "500 when a backlog waits, requests in flight adaptive from 4 up to max_in_flight 16). "
                "The SDK keeps at most 1,000 queued events and drops the rest of the burst by design.", ""]
    if "stacks" in results:
        out += [f"### Raw HTTP stacks: {args.events:,} events as pre-encoded batches of 100, one keep-alive "
                "connection (client CPU only)", "", *table(results["stacks"], "http.client"), ""]
    if "sweep" in results:
        out += [f"### Latency sweep: {args.sweep_events:,} events, the server adding latency to every request", ""]
        header = "| latency | " + " | ".join(f"{label} events/s" for label in SWEEP) + \
                 " | ours (urllib3) ÷ floor | ours (urllib3) ÷ before | max_in_flight=4 ÷ before |"
        out += [header, "| --- " * (len(SWEEP) + 4) + "|"]
        for ms, group in results["sweep"].items():
            rates = [median(group[label], "events_s") for label in SWEEP]
            out.append(f"| {ms} ms | " + " | ".join(spread(group[label], "events_s", ",.0f") for label in SWEEP) +
                       f" | {ratio(rates[1], rates[0])} | {ratio(rates[1], rates[2])} | {ratio(rates[3], rates[2])} |")
        out.append("")
    for label, group in results.get("end_to_end", {}).items():  # which stack really sent, as the server saw it
        agents = sorted({a for r in group for a in r.get("agents", [])})
        out.append(f"- {label}: User-Agent " + ", ".join(f"`{a}`" for a in agents))
    out.append("")
    out.append(END)
    return "\n".join(out) + "\n"


def write_section(section: str, path: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the section between ``begin`` and ``end`` in ``path`` (appends it the first time)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        text = ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per end-to-end and raw-stack run")
    parser.add_argument("--sweep-events", type=int, default=10_000, help="events per latency-sweep run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latencies", default=",".join(f"{x * 1000:g}" for x in LATENCIES),
                        help="latency-sweep milliseconds (comma-separated)")
    parser.add_argument("--only", default="end_to_end,stacks,sweep", help="sections to run (comma-separated)")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/lean_bench.py",
                        *(argv if argv is not None else sys.argv[1:])])
    sections = set(args.only.split(","))
    settings = Settings(False, args.repeats)
    before, started = load_average(), time.monotonic()
    results: Dict[str, Any] = {}
    with FakeOdpServer(api_key=API_KEY) as server:
        lean = Lean(server, settings)
        if "end_to_end" in sections:
            results["end_to_end"] = lean.end_to_end(args.events)
        if "stacks" in sections:
            results["stacks"] = lean.stacks(args.events)
        if "sweep" in sections:
            results["sweep"] = lean.sweep(args.sweep_events, [float(ms) / 1000 for ms in args.latencies.split(",")])
    section = report(args, command, results, (before, load_average()), time.monotonic() - started)
    print(section)
    write_section(section, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
