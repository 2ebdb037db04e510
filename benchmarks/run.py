"""Side-by-side benchmark: the SDK's own ``send_odp_event`` against ``optimizely_odp_ext`` (issue 5).

Run from the repository root::

    make bench                                  # = .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --quick  # a smaller run (about a minute)

One ``FakeOdpServer`` on 127.0.0.1 runs in this process for the whole run. Every scenario of every
target runs in a fresh subprocess (``bench_worker.py``) so RSS, CPU and threads are its own:

* target ``sdk``  — a plain ``optimizely.Optimizely`` client whose datafile integrates ODP at the fake
  server: the SDK's own ODP event manager (batch size 10, flush interval 1 s, queue of 1,000);
* target ``ours`` — another plain client with ``optimizely_odp_ext.install(client, queue_capacity=25_000)``
  in the caller-cost and throughput scenarios: the defaults except a queue sized for the 20,000-event
  burst (issue 3 fixes the default capacity at 10,000; a larger burst is dropped as queue_full by design,
  counted, with a warning). The memory/outage scenario uses ``install(client)`` with all defaults, and one
  informational section shows ours with all defaults under the same burst.

Section "Spool: cost on the caller and on throughput" (issue 4), in the same invocation: ours as above
(memory only) against the same options plus ``spool_dir`` (a fresh temporary directory per run, removed
afterwards) and plus ``spool_dir`` with ``spool_fsync=True``, interleaved run by run, each in a fresh
subprocess: caller cost from 1 thread, throughput with no added latency and with 50 ms, and the bytes the
process wrote (``/proc/self/io``) and the spool directory's peak size (sampled by this process).

Section "Caller cost at a web app's pace" (issue 12): 1 thread, calls spread evenly over a few seconds,
three targets: ``floor`` (a plain function doing the same argument checks and a ``deque.append``), ``sdk``
and ``ours``, reported as ratios, with each event's delivery latency from the server's records.

Layout: ``bench_harness.py`` (the targets' configuration, one worker subprocess, the server's records, the
per-target runner), ``bench_tables.py`` (derived figures, tables, writing the results file while keeping
``import_bench.py``'s section), ``bench_worker.py`` (what runs in each subprocess), and this file: the
scenarios (:func:`plan`, :class:`Bench`) and their sections of the results file (one function each, listed
in ``SECTIONS``, joined by :func:`report`). ``--only NAMES`` runs some scenarios again and updates their figures
in the last run's results.

Every event carries a unique ``idempotence_id``, so delivered / lost / duplicated are counted
exactly from the server's records. Results go to ``benchmarks/RESULTS.md`` (regenerated every run)
and to stdout. Not part of the test suite. Only the standard library and the package's venv are used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench_harness import (
    API_KEY,
    DEFAULT_CAPACITY,
    DEFAULTS_CALL,
    HERE,
    MORE_IN_FLIGHT,
    OURS_CALL,
    OURS_OPTIONS,
    PACED_TARGETS,
    SDK_QUIET_SECONDS,
    SPOOL_KEYS,
    SPOOL_SAMPLE_SECONDS,
    SPOOL_VARIANTS,
    TARGETS,
    DirSampler,
    FakeOdpServer,
    Runner,
    Settings,
    dir_usage,
    events_per_second,
    filesystem_of,
    install_call,
    run_one,
    summary,
)
from bench_tables import (
    CALLER_METRICS,
    background_cpu_per_10k,
    caller_medians,
    cpu_per_10k,
    delivery_ms,
    describe_options,
    dropped_queue_full,
    effective_options,
    fmt,
    heading,
    io_per_event,
    load_average,
    lossless,
    machine,
    med,
    median_of,
    ok_runs,
    peak_load,
    per_1000,
    ratio,
    send_seconds,
    sent_field,
    server_total,
    span_seconds,
    spool_disk_figure,
    summed,
    table,
    total,
    verdict_line,
    versus,
    versus_rows,
    versus_table,
    write_results,
)

# ----------------------------------------------------------------------------- the scenarios


class Bench(Runner):
    """The scenarios: each is a worker config (see bench_worker.py) run for each target by ``repeat``."""

    def caller(self, threads: int) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        return self.repeat(f"caller cost, {threads} thread(s)",
                           lambda t: self.cfg(t, "caller", threads=threads, calls=s.caller_calls,
                                              warmup=s.caller_warmup, deadline=s.deliver_deadline), 0.0)

    def paced(self) -> Dict[str, List[Dict[str, Any]]]:
        """A web app's pace (issue 12): 1 thread, calls spread evenly, against a floor measured alike."""
        s = self.settings
        return self.repeat(f"paced, {s.paced_calls:,} calls over {s.paced_seconds:g} s",
                           lambda t: self.cfg(t, "paced", calls=s.paced_calls, seconds=s.paced_seconds,
                                              warmup=s.paced_warmup, deadline=s.deliver_deadline), 0.0,
                           PACED_TARGETS)

    def throughput(self, latency: float, options: Optional[Dict[str, Any]] = None,
                   targets: Sequence[str] = TARGETS) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        shown = "" if options is None else f" options={options}"
        return self.repeat(f"throughput, {latency * 1000:.0f} ms{shown}",
                           lambda t: self.cfg(t, "throughput", options, events=s.events,
                                              deadline=s.deliver_deadline), latency, targets)

    def ceiling(self, latency: float, connections: int) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        started = time.monotonic()
        result = run_one(self.server, self.cfg("bare", "ceiling", events=s.events, connections=connections,
                                                deadline=s.deliver_deadline), latency, s)
        self.say(f"  ceiling, {latency * 1000:.0f} ms, {connections} connections [bare requests]: {summary(result)} "
                 f"({time.monotonic() - started:.1f} s)")
        return {"bare": [result]}

    def memory(self) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        runs: Dict[str, List[Dict[str, Any]]] = {}
        for target in TARGETS:
            started = time.monotonic()
            result = run_one(self.server, self.cfg(target, "memory", {}, events=s.memory_events,
                                                   warmup=s.memory_warmup, settle=1.0,
                                                   deadline=s.deliver_deadline), 0.0, s)
            runs[target] = [result]
            self.say(f"  memory during an outage [{target}]: {summary(result)} ({time.monotonic() - started:.1f} s)")
        return runs

    def spool(self) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
        """The spool section: each scenario, each variant in turn, ``spool_repeats`` times (interleaved)."""
        s = self.settings
        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {k: {v: [] for v, _, _ in SPOOL_VARIANTS}
                                                             for k in SPOOL_KEYS}
        for index in range(s.spool_repeats):
            for key in SPOOL_KEYS:
                for variant, label, extra in SPOOL_VARIANTS:
                    started = time.monotonic()
                    result = self.spool_one(key, extra)
                    runs[key][variant].append(result)
                    name = {"spool_caller1": "caller cost, 1 thread", "spool_tput0": "throughput, 0 ms",
                            "spool_tput50": f"throughput, {s.latency * 1000:.0f} ms"}[key]
                    self.say(f"  spool: {name} [ours {label}] run {index + 1}/{s.spool_repeats}: "
                             f"{summary(result)} ({time.monotonic() - started:.1f} s)")
        return runs

    def spool_one(self, key: str, extra: Dict[str, Any]) -> Dict[str, Any]:
        s = self.settings
        options = {**OURS_OPTIONS, **extra}
        directory: Optional[str] = None
        if "spool_dir" in extra:
            directory = tempfile.mkdtemp(prefix="odp-bench-spool-")
            options["spool_dir"] = directory
        if key == "spool_caller1":
            cfg = self.cfg("ours", "caller", options, threads=1, calls=s.caller_calls, warmup=s.caller_warmup,
                           deadline=s.deliver_deadline)
            latency = 0.0
        else:
            cfg = self.cfg("ours", "throughput", options, events=s.events, deadline=s.deliver_deadline)
            latency = s.latency if key == "spool_tput50" else 0.0
        sampler = DirSampler(directory) if directory is not None else None
        disk: Optional[Dict[str, Any]] = None
        try:
            result = run_one(self.server, cfg, latency, s)
        finally:
            if sampler is not None and directory is not None:
                peak, samples = sampler.stop()
                left_bytes, left_files = dir_usage(directory)  # the worker has exited: what close() left
                disk = {"peak_bytes": peak, "samples": samples, "left_bytes": left_bytes, "left_files": left_files,
                        "filesystem": filesystem_of(directory)}
                shutil.rmtree(directory, ignore_errors=True)
        if disk is not None:
            result["spool_disk"] = disk
        return result


# ----------------------------------------------------------------------------- the report

Runs = List[Dict[str, Any]]
Verdict = Tuple[str, bool, str]
THROUGHPUT_KEYS = (("tput0", "no added latency"), ("tput50", "50 ms per request"))


class Report:
    """What every section reads: a run's raw figures, its settings, and how ours was installed."""

    def __init__(self, run: Dict[str, Any]) -> None:
        self.run = run
        self.results: Dict[str, Group] = run["results"]
        self.settings = Settings(run["quick"], run["repeats"], run.get("spool_repeats"))
        self.ours_options: Dict[str, Any] = run.get("ours_options", {})  # raw files from before it was recorded: {}
        self.ours_call = install_call(self.ours_options)
        self.capacity = int(self.ours_options.get("queue_capacity", 10_000))
        self.target_label = f"ours = `{self.ours_call}`"
        self.defaults_label = f"ours = `{DEFAULTS_CALL}`, all defaults"


def report(run: Dict[str, Any]) -> Tuple[str, List[Verdict]]:
    """The results file's text (the sections of ``SECTIONS``, in order) and the verdict on each target."""
    r = Report(run)
    return "\n".join(line for section in SECTIONS for line in section(r)), verdicts(r)


def title_section(r: Report) -> List[str]:
    return ["# Benchmark results: the SDK's `send_odp_event` vs `optimizely_odp_ext`", "",
            "Generated by `benchmarks/run.py`; do not edit by hand (run it again instead)."]


def machine_section(r: Report) -> List[str]:
    out = ["", "## Machine", "", *table(["", ""], [(k, v) for k, v in r.run["machine"]])]
    load, cpus = peak_load(r.run["machine"])
    if load is not None and cpus and load > 0.5 * cpus:
        out += ["", f"**Note:** the machine was busy with other work during this run (load average up to "
                f"{load:.1f} on {cpus} CPUs); absolute figures are then lower and noisier than on an idle "
                "machine. Both targets ran under the same conditions, interleaved run by run."]
    return out


def command_section(r: Report) -> List[str]:
    s = r.settings
    out = ["", "## Command", "", f"    {r.run['command']}", "",
           f"Mode: {'quick' if s.quick else 'full'}; each caller-cost and throughput scenario run {s.repeats} "
           f"time(s) per target (figures are medians over the runs; loss columns are totals over the runs); "
           f"total time {r.run['elapsed']:.0f} s.", ""]
    for update in r.run.get("updates", []):
        load = next((v for k, v in update["machine"] if k.startswith("load average")), "unknown")
        when = next((v for k, v in update["machine"] if k.startswith("date")), "unknown")
        out += [f"Then `{update['command']}` ({when} UTC, {update['elapsed']:.0f} s, load average before / after "
                f"{load}) replaced the figures of: {', '.join(update['scenarios'])}.", ""]
    return out + targets_described(r)


def targets_described(r: Report) -> List[str]:
    """What the SDK and ours are in this run, and the options ours ran with as its workers read them back."""
    s = r.settings
    targets = ("Targets: **SDK** = a plain `Optimizely` client (the SDK's own ODP event manager: batch 10, flush "
               "interval 1 s, queue 1,000, a new connection per request).")
    if r.ours_options:
        targets += (
            f" **ours** in the caller-cost and throughput scenarios = `{r.ours_call}`: every other option at its "
            f"default. {', '.join(f'`{k}`' for k in r.ours_options)} is the one non-default option, and why: issue 3 "
            "fixes the default capacity at 10,000 (it bounds memory during an outage at about 7 MB per client); a "
            "burst larger than the queue is dropped as queue_full by design, counted "
            "(`odp_event_stats()['dropped']['queue_full']`), with a warning — and the burst here is "
            f"{s.events:,} events. The memory/outage scenario uses `{DEFAULTS_CALL}` with all defaults "
            "(10,000 held); the section 'ours with all default options' shows what the same burst does with the "
            "default queue.")
    else:
        targets += f" **ours** = `{r.ours_call}` with all default options, in every scenario."
    out = [targets + " Both targets send to the same `FakeOdpServer` on 127.0.0.1, run by the benchmark's "
           "parent process; each scenario runs in a fresh subprocess. Ratio = ours / SDK."]
    target_opts = effective_options(r.results, "tput50") or effective_options(r.results, "tput0")
    default_opts = effective_options(r.results, "memory")
    if target_opts or default_opts:
        out += ["", "Options in effect, as each worker read them back from the installed plugin:", ""]
        if target_opts:
            out += [f"- ours (caller cost, throughput): {describe_options(target_opts)}"]
        if default_opts:
            out += [f"- ours with all defaults (memory/outage, and the defaults section): "
                    f"{describe_options(default_opts)}"]
    return out


def caller_section(r: Report) -> List[str]:
    s = r.settings
    calls = s.caller_calls + s.caller_warmup
    out = heading(
        "Caller cost per `send_odp_event` call (µs, `time.perf_counter_ns` around each call)",
        f"{s.caller_calls:,} timed calls per setting (split evenly across the threads, started together), "
        f"after {s.caller_warmup:,} untimed warm-up calls; no added latency. Calls are made back to back, "
        "so the SDK's queue of 1,000 fills and part of its calls take its queue-full path; ours' queue "
        f"(queue_capacity {r.capacity:,}) {'holds all' if r.capacity >= calls else 'cannot hold all'} "
        f"{calls:,} ('events lost' is counted from the server's records). "
        "Each call also competes for the GIL with the target's own background threads, as in an application.")
    rows: List[Tuple[str, ...]] = []
    for threads in (1, 4):
        group = r.results.get(f"caller{threads}")
        if group is None:
            continue
        setting = f"{threads} thread{'s' if threads > 1 else ''}"
        sdk, ours = caller_medians(group["sdk"]), caller_medians(group["ours"])
        rows += [(setting, label, *versus(sdk[metric], ours[metric], 2)) for metric, label in CALLER_METRICS]
        rows += versus_rows(setting, group, [("events lost (all runs)",
                                              lambda rs: total(rs, lambda r: r["server"]["lost"]), 1)],
                            with_ratio=False)
    return out + versus_table("setting", rows)


PACED_MARGIN = 0.25  # seconds: "one request" on loopback, and the scheduling of a loaded machine


def paced_section(r: Report) -> List[str]:
    """Caller cost at a web app's pace (issue 12): floor, SDK and ours, as ratios, and delivery latency."""
    if "paced" not in r.results:
        return []
    runs, s = r.results["paced"], r.settings
    out = heading(
        "Caller cost at a web app's pace (issue 12)",
        f"1 thread, {s.paced_calls:,} timed calls spread evenly over {s.paced_seconds:g} s (one every "
        f"{s.paced_seconds / s.paced_calls * 1000:.1f} ms, sleeping in between as a request handler does), after "
        f"{s.paced_warmup} untimed warm-up calls; healthy server, no added latency. **floor** = a plain "
        "function doing the same argument checks and a `deque.append`, at the same pace, in the same run "
        "(after an idle pause even that costs far more than in a burst: cold caches), so compare ratios. "
        "Targets run interleaved, each run in a fresh subprocess. Delivery latency = from the call to the "
        "server having read the request carrying that event.")
    floor, sdk, ours = (caller_medians(runs.get(t, [])) for t in PACED_TARGETS)
    rows = [(f"caller {label} (µs)", fmt(floor[m], 2), fmt(sdk[m], 2), fmt(ours[m], 2), ratio(ours[m], floor[m]),
             ratio(ours[m], sdk[m])) for m, label in CALLER_METRICS]
    for key, label in (("p50_s", "p50"), ("p99_s", "p99"), ("max_s", "max")):
        sdk_ms, ours_ms = delivery_ms(runs.get("sdk", []), key), delivery_ms(runs.get("ours", []), key)
        rows.append((f"delivery latency {label} (ms)", "", fmt(sdk_ms, 0), fmt(ours_ms, 0), "", ratio(ours_ms, sdk_ms)))
    for metric in ("lost", "duplicated"):
        rows.append((f"events {metric} (all runs)", "", fmt(server_total(runs.get("sdk", []), metric)),
                     fmt(server_total(runs.get("ours", []), metric)), "", ""))
    out += table(["metric", "floor", "SDK", "ours", "ours/floor", "ours/SDK"], rows)
    return out + paced_run_by_run(runs) + paced_targets(runs, floor, sdk, ours)


def paced_run_by_run(runs: Group) -> List[str]:
    """The noise: the ratios run by run (run i of each target ran back to back)."""
    per_run = []
    for f_run, s_run, o_run in zip(*(runs.get(t, []) for t in PACED_TARGETS)):
        if f_run.get("ok") and s_run.get("ok") and o_run.get("ok"):
            per_run.append(f"{ratio(o_run['sent']['p50_us'], f_run['sent']['p50_us'])} / "
                           f"{ratio(o_run['sent']['p50_us'], s_run['sent']['p50_us'])} / "
                           f"{ratio(o_run['sent']['p99_us'], s_run['sent']['p99_us'])}")
    return ["", "Run by run, p50 ours/floor / p50 ours/SDK / p99 ours/SDK: " + "; ".join(per_run) + "."] if per_run \
        else []


def paced_targets(runs: Group, floor: Dict[str, Optional[float]], sdk: Dict[str, Optional[float]],
                  ours: Dict[str, Optional[float]]) -> List[str]:
    """Issue 12's targets, judged from the paced medians (shown, not part of the ``--strict`` verdicts)."""
    interval = float(effective_options({"paced": runs}, "paced").get("flush_interval", 1.0))
    f50, s50, o50 = floor["p50_us"], sdk["p50_us"], ours["p50_us"]
    s99, o99 = sdk["p99_us"], ours["p99_us"]
    worst = delivery_ms(runs.get("ours", []), "max_s")
    checks = [
        (o50 is not None and f50 is not None and o50 <= 1.5 * f50,
         f"caller p50 at most 1.5x the floor: {ratio(o50, f50)}"),
        (o50 is not None and s50 is not None and o50 <= 0.15 * s50,
         f"caller p50 at most 0.15x the SDK's: {ratio(o50, s50)}"),
        (o99 is not None and s99 is not None and o99 <= 0.3 * s99,
         f"caller p99 at most 0.3x the SDK's: {ratio(o99, s99)}"),
        (worst is not None and worst <= (interval + PACED_MARGIN) * 1000,
         f"delivery latency at most flush_interval ({interval:g} s) plus one request ({PACED_MARGIN:g} s allowed): "
         f"max {fmt(worst, 0)} ms"),
    ]
    lines = ["", "Targets of issue 12:", "", *(verdict_line(ok, text) for ok, text in checks)]
    if f50 is not None and s50 is not None and f50 > 0.15 * s50:
        lines += ["", f"The floor itself cost {ratio(f50, s50)} the SDK's p50 in this run: a p50 of 0.15x the SDK's "
                      "is below what the same argument checks and a `deque.append` cost at this pace, out of reach "
                      "for any code that validates and queues the event."]
    return lines


def throughput_section(r: Report) -> List[str]:
    s = r.settings
    out = heading(
        "End-to-end throughput and loss",
        f"{s.events:,} events sent as fast as one caller thread can; then ours: `flush_odp_events()`; "
        f"SDK: the server's count polled until all arrived or no request for {SDK_QUIET_SECONDS} s "
        f"(bounded by {s.deliver_deadline:.0f} s), then `close()`. Throughput = unique events delivered / "
        "(time from the first send to the last event recorded by the server).")
    rows: List[Tuple[str, ...]] = []
    for key, label in THROUGHPUT_KEYS:
        group = r.results.get(key)
        if group is None:
            continue
        sent = fmt(server_total(group["ours"], "sent"))
        rows += versus_rows(label, group, [("events/s delivered", median_of(events_per_second), 0)])
        rows += versus_rows(label, group, [(f"{metric} (all runs, of {sent} sent)", summed(metric), 1)
                                           for metric in ("delivered", "lost", "duplicated")], with_ratio=False)
        rows += versus_rows(label, group, [("caller's send loop (s)", median_of(send_seconds), 3),
                                           ("first send to last event recorded (s)", median_of(span_seconds), 2)])
    return out + versus_table("latency", rows)


def defaults_figures(results: Dict[str, Group], key: str) -> Tuple[Runs, Optional[float], Optional[float]]:
    """Ours with all defaults in throughput scenario ``key``: its runs, its rate, and the SDK's in the same scenario."""
    runs = results[key]["ours"]
    base = "tput0" if key.startswith("tput0") else "tput50"
    sdk_rate = med(results[base]["sdk"], events_per_second) if base in results else None
    return runs, med(runs, events_per_second), sdk_rate


def defaults_section(r: Report) -> List[str]:
    """For information: ours with every option at its default, under the same burst."""
    keys = [(k, label) for k, label in (("tput0_defaults", "no added latency"),
                                        ("tput50_defaults", "50 ms per request")) if k in r.results]
    if not keys:
        return []
    events = r.settings.events
    out = heading(
        "For information: ours with all default options (`queue_capacity` 10,000)",
        f"Not used for the targets. The same throughput scenario with `{DEFAULTS_CALL}`: "
        + (f"the {events:,}-event burst is larger than the default queue, so whatever the worker "
           "has not taken from the queue when it is full is dropped as queue_full — by design (issue 3), "
           "counted in `odp_event_stats()` and logged as a warning. "
           if events > DEFAULT_CAPACITY else
           f"this mode's {events:,}-event burst fits the default queue (the full run's 20,000 does "
           "not). ")
        + "'lost' is from the server's records, 'dropped as queue_full' is ours' own count; they agree when "
        "nothing else was lost.", level=3)
    rows = []
    for key, label in keys:
        runs, rate, sdk_rate = defaults_figures(r.results, key)
        rows.append((label, fmt(rate, 0), ratio(rate, sdk_rate),
                     f"{fmt(server_total(runs, 'delivered'))} of {fmt(server_total(runs, 'sent'))}",
                     fmt(server_total(runs, "lost")), fmt(dropped_queue_full(runs)), str(len(runs))))
    return out + table(["latency", "events/s delivered", "ours/SDK events/s", "delivered (all runs)",
                        "lost (all runs, server)", "dropped as queue_full (all runs, ours' count)", "runs"], rows)


INFO_VARIANTS = (
    ("tput0_mif8", "ours, queue_capacity=25,000 + max_in_flight=8 — no added latency"),
    ("ceil0_4", "ceiling: bare requests, 4 connections — no added latency"),
    ("ceil0_8", "ceiling: bare requests, 8 connections — no added latency"),
    ("tput50_mif8", "ours, queue_capacity=25,000 + max_in_flight=8 — 50 ms"),
    ("ceil50_4", "ceiling: bare requests, 4 connections — 50 ms"),
    ("ceil50_8", "ceiling: bare requests, 8 connections — 50 ms"),
)


def ceiling_section(r: Report) -> List[str]:
    """For information: more requests in flight, and the setup's ceiling."""
    info = [(k, label) for k, label in INFO_VARIANTS if k in r.results]
    if not info:
        return []
    out = heading(
        "For information: more requests in flight, and the ceiling of this setup",
        f"Not used for the targets. The throughput scenario with `{r.ours_call}` plus `max_in_flight=8`, and "
        "a calibration without any Optimizely client: N threads, each with a keep-alive `requests.Session`, "
        "POSTing pre-encoded batches of 100 of the same events to the same server — about the most a Python "
        "sender using `requests` with N connections can get from this `FakeOdpServer` on this machine.", level=3)
    rows = []
    for key, label in info:
        runs = next(iter(r.results[key].values()))
        rows.append((label, fmt(med(runs, events_per_second), 0),
                     f"{fmt(server_total(runs, 'lost'))} of {fmt(server_total(runs, 'sent'))}",
                     fmt(per_1000(runs, "requests"), 2), fmt(per_1000(runs, "connections"), 2),
                     fmt(cpu_per_10k(runs), 3), str(len(runs))))
    return out + table(["variant", "events/s delivered", "lost (all runs)", "requests / 1,000", "connections / 1,000",
                        "CPU s / 10,000", "runs"], rows)


def requests_section(r: Report) -> List[str]:
    out = heading("Requests and new TCP connections per 1,000 delivered events",
                  "From the throughput runs (`server.requests`, `server.connection_count`).")
    rows: List[Tuple[str, ...]] = []
    for key, label in THROUGHPUT_KEYS:
        if key in r.results:
            rows += versus_rows(label, r.results[key],
                                [("requests / 1,000 events", lambda rs: per_1000(rs, "requests"), 2),
                                 ("new connections / 1,000 events", lambda rs: per_1000(rs, "connections"), 2)])
    return out + versus_table("latency", rows)


def memory_figures(results: Dict[str, Group]) -> Tuple[Dict[str, Dict[str, Optional[float]]], bool]:
    """Per target, the memory/outage figures of its first good run (empty without one); and whether ours held
    no more than its queue_capacity."""
    data: Dict[str, Dict[str, Optional[float]]] = {}
    held_ok = True
    for t in TARGETS:
        runs = ok_runs(results["memory"][t])
        if not runs:
            data[t] = {}
            continue
        first = runs[0]
        s = first["sent"]
        growth = (s["hwm_kib"] if s.get("peak_reset") else s["rss1_kib"]) - s["rss0_kib"]
        held = s["held"]
        per = growth * 1024 / held if held else None
        data[t] = {"outage_sent": s["outage_sent"], "held": held, "growth": growth, "per": per,
                   "per10k": per * 10_000 / 1024 / 1024 if per is not None else None,
                   "delivered": first["server"]["delivered"], "lost": first["server"]["lost"],
                   "dup": first["server"]["duplicated"]}
        if t == "ours":
            from optimizely_odp_ext import Options

            bound = (s.get("effective_options") or {}).get("queue_capacity", Options().queue_capacity)
            held_ok = held <= bound
    return data, held_ok


def memory_section(r: Report) -> List[str]:
    if "memory" not in r.results:
        return []
    s = r.settings
    out = heading(
        "Memory while events are held during an outage",
        f"After {s.memory_warmup} delivered warm-up events, the server answers every request with "
        f"503 (`fail_for`); {s.memory_events:,} events are sent (built on the fly, so everything they "
        "keep alive counts), then after 1 s the subprocess reads its peak RSS (`VmHWM` from "
        "/proc/self/status, reset before sending via /proc/self/clear_refs) against its RSS before sending. "
        "'Held' is what the sender actually keeps: ours `pending` from `odp_event_stats()`; the SDK its queue "
        "(capped at 1,000) plus its current batch — the rest of its events are dropped at once. Per 10,000 "
        "held is extrapolated from per held event for the SDK. Then the outage ends and each target drains "
        "and closes.")
    data, _ = memory_figures(r.results)
    rows = []
    for metric, name, digits in (("outage_sent", "events sent during the outage", 0),
                                 ("held", "events held (what each actually keeps)", 0),
                                 ("growth", "peak RSS growth (KiB)", 0),
                                 ("per", "bytes per held event", 0),
                                 ("per10k", "RSS growth per 10,000 held events (MiB)", 2),
                                 ("delivered", "delivered after the outage (incl. warm-up)", 0),
                                 ("lost", "lost (incl. warm-up)", 0),
                                 ("dup", "duplicated", 0)):
        sdk_v, ours_v = data["sdk"].get(metric), data["ours"].get(metric)
        is_int = metric in ("outage_sent", "held", "growth", "delivered", "lost", "dup")
        rows.append((name, fmt(int(sdk_v) if is_int and sdk_v is not None else sdk_v, digits),
                     fmt(int(ours_v) if is_int and ours_v is not None else ours_v, digits),
                     ratio(ours_v, sdk_v) if metric in ("growth", "per", "per10k", "held") else ""))
    return out + table(["metric", "SDK", "ours", "ours/SDK"], rows)


def cpu_section(r: Report) -> List[str]:
    out = heading(
        "CPU seconds (process user + sys) per 10,000 events",
        "From the throughput runs: `time.process_time()` in the subprocess from the first send until "
        "`close()` returned, per 10,000 events delivered (the metric of issue 5) and per 10,000 calls made "
        "(the SDK drops most of its events, which inflates its per-delivered figure); and the CPU of the "
        "target's own background threads only (from /proc/self/task, before `close()`), per 10,000 delivered.")
    rows: List[Tuple[str, ...]] = []
    for key, label in THROUGHPUT_KEYS:
        if key in r.results:
            rows += versus_rows(label, r.results[key],
                                [("process CPU s / 10,000 delivered", cpu_per_10k, 3),
                                 ("process CPU s / 10,000 calls made", lambda rs: cpu_per_10k(rs, "sent"), 3),
                                 ("background threads CPU s / 10,000 delivered", background_cpu_per_10k, 3)])
    return out + versus_table("latency", rows)


def spool_section(r: Report) -> List[str]:
    """Memory only vs spool_dir vs spool_dir + spool_fsync (issue 4): the table, and a reading of it."""
    if not all(key in r.results for key in SPOOL_KEYS):
        return []
    results, s = r.results, r.settings
    disks = [run["spool_disk"] for key in SPOOL_KEYS for v, _, _ in SPOOL_VARIANTS for run in ok_runs(results[key][v])
             if run.get("spool_disk")]
    where = disks[0]["filesystem"] if disks else "unknown"
    fewer = s.spool_repeats < s.repeats
    out = heading(
        "Spool: cost on the caller and on throughput (issue 4)",
        f"ours = `{r.ours_call}` (memory only), against the same call plus `spool_dir=<dir>` and plus "
        "`spool_dir=<dir>, spool_fsync=True`, where `<dir>` is a fresh temporary directory for every run, removed "
        f"after it (filesystem: {where}). The three variants run interleaved, each run in a fresh subprocess, "
        f"{s.spool_repeats} run(s) per variant and scenario"
        + (f" (fewer than the {s.repeats} of the other sections, to keep the full run short)" if fewer else "")
        + "; figures are medians over the runs, loss columns totals. Caller cost: as above, 1 thread, "
        f"{s.caller_calls:,} timed calls after {s.caller_warmup:,} untimed ones. Throughput: as "
        f"above, {s.events:,} events from one caller thread, then `flush_odp_events()`. 'Bytes written "
        "per event' is the worker process's `wchar` from `/proc/self/io` (bytes passed to `write()` on files "
        "and pipes — the spool's records and acknowledgement indexes; socket sends are not counted) from the "
        "first send until `flush_odp_events()` returned, per event sent. 'Peak spool size' is the directory's "
        f"size sampled every {SPOOL_SAMPLE_SECONDS * 1000:.0f} ms by the benchmark's parent process (segments "
        "are deleted once every record in them is delivered). Ratio = variant / memory only. "
        "Loss and duplicates are counted from the server's records.")
    lines, medians = spool_table(results, s)
    return out + lines + spool_reading(results, medians, s)


SpoolMedians = Dict[Tuple[str, str], Dict[str, Optional[float]]]


def spool_table(results: Dict[str, Group], settings: Settings) -> Tuple[List[str], SpoolMedians]:
    """The spool table, a column per variant (and its ratio to memory only), and the medians it shows."""
    names = [v for v, _, _ in SPOOL_VARIANTS]
    rows: List[Tuple[str, ...]] = []
    medians: SpoolMedians = {}

    def add(setting: str, metric: str, key: str, fn: Callable[[Runs], Optional[float]],
            digits: int, *, with_ratio: bool = True, memory_na: bool = False) -> None:
        values = {v: fn(results[key][v]) for v in names}
        if memory_na:
            values["memory"] = None
        medians[(key, metric)] = values
        row = [setting, metric]
        for v in names:
            value = values[v]
            row.append(fmt(int(value) if digits == 0 and isinstance(value, float) and value.is_integer() else value,
                           digits))
            if v != "memory":
                row.append(ratio(value, values["memory"]) if with_ratio else "")
        rows.append(tuple(row))

    caller_label = "caller cost, 1 thread (µs)"
    for metric, label in CALLER_METRICS:
        add(caller_label, label, "spool_caller1", median_of(sent_field(metric)), 2)
    for metric in ("lost", "duplicated"):
        add(caller_label, f"events {metric} (all runs)", "spool_caller1", summed(metric), 0, with_ratio=False)
    for key, label in (("spool_tput0", "throughput, no added latency"),
                       ("spool_tput50", f"throughput, {settings.latency * 1000:.0f} ms per request")):
        sent_total = server_total(results[key]["memory"], "sent")
        add(label, "events/s delivered", key, median_of(events_per_second), 0)
        add(label, "caller's send loop (s)", key, median_of(send_seconds), 3)
        add(label, "first send to last event recorded (s)", key, median_of(span_seconds), 2)
        for metric in ("delivered", "lost", "duplicated"):
            add(label, f"{metric} (all runs, of {fmt(sent_total)} sent)", key, summed(metric), 0, with_ratio=False)
        add(label, "process CPU s / 10,000 delivered", key, cpu_per_10k, 3)
        add(label, "bytes written per event (wchar)", key, median_of(io_per_event("wchar")), 0, with_ratio=False)
        add(label, "write() calls per 1,000 events", key, median_of(io_per_event("syscw", 1000.0)), 1,
            with_ratio=False)
        add(label, "peak spool size (KiB)", key, median_of(spool_disk_figure("peak_bytes", 1 / 1024)), 0,
            with_ratio=False, memory_na=True)
        add(label, "left in the spool after close (bytes, all runs)", key,
            lambda runs: total(runs, lambda r: int((r.get("spool_disk") or {}).get("left_bytes", 0))), 0,
            with_ratio=False, memory_na=True)
    header = ["setting", "metric"]
    for v, label, _ in SPOOL_VARIANTS:
        header.append(f"ours {label}")
        if v != "memory":
            header.append(f"{v} / memory")
    return table(header, rows), medians


def spool_reading(results: Dict[str, Group], medians: SpoolMedians, settings: Settings) -> List[str]:
    """A one-paragraph reading of the spool table (the same numbers)."""
    def both(key: str, metric: str, variant: str) -> Tuple[Optional[float], Optional[float]]:
        found = medians.get((key, metric), {})
        return found.get("memory"), found.get(variant)

    losses = {v: sum(int(server_total(results[k][v], "lost") or 0) + int(server_total(results[k][v], "duplicated")
                                                                         or 0) for k in SPOOL_KEYS)
              for v, _, _ in SPOOL_VARIANTS}
    parts = []
    for v, label, _ in SPOOL_VARIANTS[1:]:
        p50, p99 = both("spool_caller1", "p50", v), both("spool_caller1", "p99", v)
        t0, t50 = both("spool_tput0", "events/s delivered", v), both("spool_tput50", "events/s delivered", v)
        parts.append(f"`{label.lstrip('+ ')}`: caller p50 {fmt(p50[1], 2)} µs vs {fmt(p50[0], 2)} µs "
                     f"({ratio(p50[1], p50[0])}), p99 {fmt(p99[1], 1)} vs {fmt(p99[0], 1)} µs "
                     f"({ratio(p99[1], p99[0])}); "
                     f"throughput {fmt(t0[1], 0)} vs {fmt(t0[0], 0)} events/s with no added latency "
                     f"({ratio(t0[1], t0[0])}) and {fmt(t50[1], 0)} vs {fmt(t50[0], 0)} at "
                     f"{settings.latency * 1000:.0f} ms ({ratio(t50[1], t50[0])}); lost + duplicated over all its "
                     f"runs: {fmt(losses[v])}")
    return ["", "Reading (medians, with the spool vs memory only): " + "; ".join(parts) + "."]


def verdicts(r: Report) -> List[Verdict]:
    """Issue 5's targets, each (name, met, the figures), from the run's medians (``--strict`` judges these)."""
    results, found = r.results, []
    if "caller1" in results and "caller4" in results:
        caller = {th: caller_medians(results[f"caller{th}"]["ours"]) for th in (1, 4)}
        sdk = {th: caller_medians(results[f"caller{th}"]["sdk"]) for th in (1, 4)}
        p50 = {th: (caller[th]["p50_us"], sdk[th]["p50_us"]) for th in (1, 4)}
        found.append((f"Caller p50 at most half the SDK's (1 and 4 threads) [{r.target_label}]",
                      all(o is not None and s is not None and o <= s / 2 for o, s in p50.values()),
                      "; ".join(f"{th} thread(s): ours {fmt(o, 2)} µs vs SDK {fmt(s, 2)} µs (ratio {ratio(o, s)})"
                                for th, (o, s) in p50.items())))
        p99 = caller[4]["p99_us"]
        found.append((f"Caller p99 under 50 µs with 4 threads [{r.target_label}]", p99 is not None and p99 < 50,
                      f"ours p99 with 4 threads: {fmt(p99, 2)} µs"))
    if "tput50" in results:
        runs = results["tput50"]["ours"]
        rate, no_loss = med(runs, events_per_second), lossless(runs)
        found.append((f">= 5,000 events/s delivered with zero loss at 50 ms latency [{r.target_label}]",
                      rate is not None and rate >= 5000 and no_loss,
                      f"ours: {fmt(rate, 0)} events/s, zero loss: {'yes' if no_loss else 'NO'} "
                      f"(lost {server_total(runs, 'lost')}, duplicated {server_total(runs, 'duplicated')} over all "
                      "runs)"))
    if "tput0" in results:
        o, s = med(results["tput0"]["ours"], events_per_second), med(results["tput0"]["sdk"], events_per_second)
        found.append((f">= 10x the SDK's throughput with no added latency [{r.target_label}]",
                      o is not None and s is not None and s > 0 and o >= 10 * s,
                      f"ours {fmt(o, 0)} events/s vs SDK {fmt(s, 0)} events/s (ratio {ratio(o, s)})"))
    if "memory" in results:
        data, held_ok = memory_figures(results)
        per = data["ours"].get("per")
        found.append((f"Memory per held event under 1 KB (and within the configured bound) [{r.defaults_label}]",
                      per is not None and per < 1024 and held_ok,
                      f"ours: {fmt(per, 0)} bytes per held event; held within queue_capacity: "
                      f"{'yes' if held_ok else 'NO'}"))
    return found


def targets_section(r: Report) -> List[str]:
    out = ["", "## Targets (issue 5)", ""]
    out += [verdict_line(ok, f"{name}: {text}") for name, ok, text in verdicts(r)]
    for key, label in (("tput50_defaults", "50 ms latency"), ("tput0_defaults", "no added latency")):
        if key in r.results:
            runs, rate, sdk_rate = defaults_figures(r.results, key)
            out += [f"- *For information, not judged* — {label} [{r.defaults_label}]: {fmt(rate, 0)} events/s "
                    f"(ratio to the SDK {ratio(rate, sdk_rate)}), lost {fmt(server_total(runs, 'lost'))} of "
                    f"{fmt(server_total(runs, 'sent'))}, of which ours counted {fmt(dropped_queue_full(runs))} as "
                    "queue_full" + (" — the burst is larger than the default queue, dropped by design."
                                    if r.settings.events > DEFAULT_CAPACITY else ".")]
    return out


def raw_section(r: Report) -> List[str]:
    return ["", "## Raw per-run figures", "", "```", *(line.strip() for line in r.run["log"]), "```", ""]


# The results file, section by section. A new scenario's table is a function here (``heading`` and
# ``versus_rows``/``versus_table`` or ``table`` from bench_tables.py) and a line in this list.
SECTIONS: Tuple[Callable[[Report], List[str]], ...] = (
    title_section, machine_section, command_section, caller_section, paced_section, throughput_section,
    defaults_section, ceiling_section, requests_section, memory_section, cpu_section, spool_section,
    targets_section, raw_section)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and one run per scenario (~1 minute)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per caller-cost and throughput scenario (default 3, quick 1)")
    parser.add_argument("--no-info", action="store_true",
                        help="skip the informational runs (all defaults, max_in_flight=8, calibration ceiling)")
    parser.add_argument("--spool-repeats", type=int, default=None,
                        help="runs per scenario and variant in the spool section (default: as --repeats)")
    parser.add_argument("--no-spool", action="store_true",
                        help="skip the spool section (memory only vs spool_dir vs spool_dir + spool_fsync)")
    parser.add_argument("--only", metavar="NAMES",
                        help="run only these scenarios (comma-separated, e.g. paced) and update their figures in "
                             "the last run's raw file and results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target of issue 5 is not met")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"),
                        help="the results file to write (its raw figures go beside it, .json)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the results file from saved raw figures")
    args = parser.parse_args(argv)
    raw_path = os.path.splitext(args.output)[0] + ".json"
    if args.render:
        with open(args.render, encoding="utf-8") as handle:
            return write_report(json.load(handle), args.output, None, args.strict)
    settings = Settings(args.quick, args.repeats, args.spool_repeats)
    only = set(args.only.split(",")) if args.only else None
    command = " ".join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                        else sys.executable, *([os.path.relpath(sys.argv[0])] if sys.argv else []),
                        *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    load_before = load_average()
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    server = FakeOdpServer(api_key=API_KEY).start()
    bench = Bench(server, settings)
    try:
        bench.say(f"FakeOdpServer at {server.url}; mode {'quick' if settings.quick else 'full'}, "
                  f"{settings.repeats} run(s) per scenario; ours = {OURS_CALL} unless options= says otherwise "
                  f"(memory: {DEFAULTS_CALL})")
        for name, run_scenario in plan(bench, settings, info=not args.no_info, spool=not args.no_spool):
            if only is None or name in only:
                results.update(run_scenario())
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    if only is not None:
        # Only some scenarios ran: their figures replace those of the last full run, which keeps its own.
        with open(raw_path, encoding="utf-8") as handle:
            run = json.load(handle)
        run["results"].update(results)
        run["log"] += [f"--- {command}", *bench.log[1:]]
        run.setdefault("updates", []).append({"command": command, "scenarios": sorted(only),
                                              "elapsed": elapsed, "machine": machine(load_before)})
        return write_report(run, args.output, raw_path, args.strict)
    run = {"quick": settings.quick, "repeats": settings.repeats, "spool_repeats": settings.spool_repeats,
           "command": command, "ours_options": OURS_OPTIONS,
           "elapsed": elapsed, "machine": machine(load_before), "log": bench.log, "results": results}
    return write_report(run, args.output, raw_path, args.strict)


Group = Dict[str, List[Dict[str, Any]]]


def plan(bench: Bench, settings: Settings, info: bool,
         spool: bool) -> List[Tuple[str, Callable[[], Dict[str, Group]]]]:
    """Every scenario of a run, in order: its name (for ``--only``) and how to run it, giving its results by key.

    A new scenario is a line here, a method of :class:`Bench` (its worker config), a function in
    ``bench_worker.py`` and its section of the results file (a function in ``SECTIONS``).
    """
    latency = settings.latency

    def one(key: str, run: Callable[[], Group]) -> Tuple[str, Callable[[], Dict[str, Group]]]:
        return key, lambda: {key: run()}

    steps = [one("caller1", lambda: bench.caller(1)), one("caller4", lambda: bench.caller(4)),
             one("paced", bench.paced),
             one("tput0", lambda: bench.throughput(0.0)), one("tput50", lambda: bench.throughput(latency))]
    if info:
        steps += [one("tput0_defaults", lambda: bench.throughput(0.0, {}, targets=("ours",))),
                  one("tput50_defaults", lambda: bench.throughput(latency, {}, targets=("ours",))),
                  one("tput0_mif8", lambda: bench.throughput(0.0, MORE_IN_FLIGHT, targets=("ours",))),
                  one("tput50_mif8", lambda: bench.throughput(latency, MORE_IN_FLIGHT, targets=("ours",))),
                  one("ceil0_4", lambda: bench.ceiling(0.0, 4)), one("ceil0_8", lambda: bench.ceiling(0.0, 8)),
                  one("ceil50_4", lambda: bench.ceiling(latency, 4)),
                  one("ceil50_8", lambda: bench.ceiling(latency, 8))]
    steps.append(one("memory", bench.memory))
    if spool:
        steps.append(("spool", bench.spool))
    return steps


def write_report(run: Dict[str, Any], output: str, raw_path: Optional[str], strict: bool) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if raw_path is not None:
        with open(raw_path, "w", encoding="utf-8") as handle:
            json.dump(run, handle, indent=1)
    text, verdicts = report(run)
    write_results(text, output)
    print()
    print(text.split("## Raw per-run figures")[0])
    print(f"Wrote {os.path.relpath(output)}" + (f" and {os.path.relpath(raw_path)}" if raw_path else "") + ".")
    results = run["results"]
    errors = [r for group in results.values() for runs in group.values() for r in runs if not r.get("ok")]
    if errors:
        print(f"{len(errors)} scenario run(s) failed; see the raw figures in the results file.")
        return 2
    return 1 if strict and not all(ok for _, ok, _ in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
