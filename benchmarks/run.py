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
scenarios (:func:`plan`, :class:`Bench`) and their tables (:func:`report`). ``--only NAMES`` runs some
scenarios again and updates their figures in the last run's results.

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
    background_cpu_per_10k,
    cpu_per_10k,
    describe_options,
    dropped_queue_full,
    effective_options,
    fmt,
    load_average,
    lossless,
    machine,
    med,
    ok_runs,
    per_1000,
    ratio,
    send_seconds,
    server_total,
    span_seconds,
    table,
    total,
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


def report(run: Dict[str, Any]) -> Tuple[str, List[Tuple[str, bool, str]]]:
    """The results file's text, and the verdict on each target, from a run's raw figures."""
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = run["results"]
    settings = Settings(run["quick"], run["repeats"], run.get("spool_repeats"))
    ours_options: Dict[str, Any] = run.get("ours_options", {})  # raw files from before it was recorded: {}
    ours_call = install_call(ours_options)
    capacity = int(ours_options.get("queue_capacity", 10_000))
    command, elapsed = run["command"], run["elapsed"]
    out: List[str] = ["# Benchmark results: the SDK's `send_odp_event` vs `optimizely_odp_ext`", "",
                      "Generated by `benchmarks/run.py`; do not edit by hand (run it again instead).", ""]
    out += ["## Machine", ""]
    out += table(["", ""], [(k, v) for k, v in run["machine"]])
    loads = [float(x) for k, v in run["machine"] if k.startswith("load average") for x in v.replace("/", " ").split()
             if x.replace(".", "", 1).isdigit()]
    cpus = next((int(v) for k, v in run["machine"] if k.startswith("nproc") and v.isdigit()), 0)
    if loads and cpus and max(loads) > 0.5 * cpus:
        out += ["", f"**Note:** the machine was busy with other work during this run (load average up to "
                f"{max(loads):.1f} on {cpus} CPUs); absolute figures are then lower and noisier than on an idle "
                "machine. Both targets ran under the same conditions, interleaved run by run."]
    mode = "quick" if settings.quick else "full"
    out += ["", "## Command", "", f"    {command}", "",
            f"Mode: {mode}; each caller-cost and throughput scenario run {settings.repeats} time(s) per target "
            f"(figures are medians over the runs; loss columns are totals over the runs); "
            f"total time {elapsed:.0f} s.", ""]
    for update in run.get("updates", []):
        load = next((v for k, v in update["machine"] if k.startswith("load average")), "unknown")
        when = next((v for k, v in update["machine"] if k.startswith("date")), "unknown")
        out += [f"Then `{update['command']}` ({when} UTC, {update['elapsed']:.0f} s, load average before / after "
                f"{load}) replaced the figures of: {', '.join(update['scenarios'])}.", ""]
    out += [
            "Targets: **SDK** = a plain `Optimizely` client (the SDK's own ODP event manager: batch 10, flush "
            "interval 1 s, queue 1,000, a new connection per request)."]
    if ours_options:
        out[-1] += (
            f" **ours** in the caller-cost and throughput scenarios = `{ours_call}`: every other option at its "
            f"default. {', '.join(f'`{k}`' for k in ours_options)} is the one non-default option, and why: issue 3 "
            "fixes the default capacity at 10,000 (it bounds memory during an outage at about 7 MB per client); a "
            "burst larger than the queue is dropped as queue_full by design, counted "
            "(`odp_event_stats()['dropped']['queue_full']`), with a warning — and the burst here is "
            f"{settings.events:,} events. The memory/outage scenario uses `{DEFAULTS_CALL}` with all defaults "
            "(10,000 held); the section 'ours with all default options' shows what the same burst does with the "
            "default queue.")
    else:
        out[-1] += f" **ours** = `{ours_call}` with all default options, in every scenario."
    out[-1] += (" Both targets send to the same `FakeOdpServer` on 127.0.0.1, run by the benchmark's parent "
                "process; each scenario runs in a fresh subprocess. Ratio = ours / SDK.")
    out += [""]
    target_opts = effective_options(results, "tput50") or effective_options(results, "tput0")
    default_opts = effective_options(results, "memory")
    if target_opts or default_opts:
        out += ["Options in effect, as each worker read them back from the installed plugin:", ""]
        if target_opts:
            out += [f"- ours (caller cost, throughput): {describe_options(target_opts)}"]
        if default_opts:
            out += [f"- ours with all defaults (memory/outage, and the defaults section): "
                    f"{describe_options(default_opts)}"]
        out += [""]
    target_label = f"ours = `{ours_call}`"
    defaults_label = f"ours = `{DEFAULTS_CALL}`, all defaults"
    verdicts: List[Tuple[str, bool, str]] = []

    # --- caller cost
    out += ["## Caller cost per `send_odp_event` call (µs, `time.perf_counter_ns` around each call)", "",
            f"{settings.caller_calls:,} timed calls per setting (split evenly across the threads, started together), "
            f"after {settings.caller_warmup:,} untimed warm-up calls; no added latency. Calls are made back to back, "
            "so the SDK's queue of 1,000 fills and part of its calls take its queue-full path; ours' queue "
            f"(queue_capacity {capacity:,}) "
            f"{'holds all' if capacity >= settings.caller_calls + settings.caller_warmup else 'cannot hold all'} "
            f"{settings.caller_calls + settings.caller_warmup:,} ('events lost' is counted from the server's records). "
            "Each call also competes for the GIL with the target's own background threads, as in an application.",
            ""]
    rows = []
    caller: Dict[int, Dict[str, Dict[str, Optional[float]]]] = {}
    for threads in (1, 4):
        key = f"caller{threads}"
        if key not in results:
            continue
        caller[threads] = {}
        for target in TARGETS:
            runs = results[key][target]
            caller[threads][target] = {m: med(runs, lambda r, m=m: r["sent"][m])
                                       for m in ("p50_us", "p99_us", "max_us", "mean_us")}
        for metric, label in (("p50_us", "p50"), ("p99_us", "p99"), ("max_us", "max"), ("mean_us", "mean")):
            sdk_v, ours_v = caller[threads]["sdk"][metric], caller[threads]["ours"][metric]
            rows.append((f"{threads} thread{'s' if threads > 1 else ''}", label, fmt(sdk_v, 2), fmt(ours_v, 2),
                         ratio(ours_v, sdk_v)))
        lost = {t: total(results[key][t], lambda r: r["server"]["lost"]) for t in TARGETS}
        rows.append((f"{threads} thread{'s' if threads > 1 else ''}", "events lost (all runs)",
                     fmt(lost["sdk"]), fmt(lost["ours"]), ""))
    out += table(["setting", "metric", "SDK", "ours", "ours/SDK"], rows)

    if "paced" in results:
        out += paced_section(results["paced"], settings)

    # --- throughput
    out += ["", "## End-to-end throughput and loss", "",
            f"{settings.events:,} events sent as fast as one caller thread can; then ours: `flush_odp_events()`; "
            f"SDK: the server's count polled until all arrived or no request for {SDK_QUIET_SECONDS} s "
            f"(bounded by {settings.deliver_deadline:.0f} s), then `close()`. Throughput = unique events delivered / "
            "(time from the first send to the last event recorded by the server).", ""]
    rows = []
    tput: Dict[str, Dict[str, Optional[float]]] = {}
    zero_loss: Dict[str, Dict[str, bool]] = {}
    for key, label in (("tput0", "no added latency"), ("tput50", "50 ms per request")):
        if key not in results:
            continue
        group = results[key]
        tput[key] = {t: med(group[t], events_per_second) for t in TARGETS}
        zero_loss[key] = {t: lossless(group[t]) for t in TARGETS}
        sdk_rate, ours_rate = tput[key]["sdk"], tput[key]["ours"]
        rows.append((label, "events/s delivered", fmt(sdk_rate, 0), fmt(ours_rate, 0), ratio(ours_rate, sdk_rate)))
        sent_total = server_total(group["ours"], "sent")
        for metric in ("delivered", "lost", "duplicated"):
            rows.append((label, f"{metric} (all runs, of {fmt(sent_total)} sent)",
                         fmt(server_total(group["sdk"], metric)), fmt(server_total(group["ours"], metric)), ""))
        send_s = {t: med(group[t], send_seconds) for t in TARGETS}
        span = {t: med(group[t], span_seconds) for t in TARGETS}
        rows.append((label, "caller's send loop (s)", fmt(send_s["sdk"], 3), fmt(send_s["ours"], 3),
                     ratio(send_s["ours"], send_s["sdk"])))
        rows.append((label, "first send to last event recorded (s)", fmt(span["sdk"], 2), fmt(span["ours"], 2),
                     ratio(span["ours"], span["sdk"])))
    out += table(["latency", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- information: ours with every option at its default, under the same burst
    defaults = [(k, label) for k, label in (("tput0_defaults", "no added latency"),
                                            ("tput50_defaults", "50 ms per request")) if k in results]
    if defaults:
        out += ["", "### For information: ours with all default options (`queue_capacity` 10,000)", "",
                f"Not used for the targets. The same throughput scenario with `{DEFAULTS_CALL}`: "
                + (f"the {settings.events:,}-event burst is larger than the default queue, so whatever the worker "
                   "has not taken from the queue when it is full is dropped as queue_full — by design (issue 3), "
                   "counted in `odp_event_stats()` and logged as a warning. "
                   if settings.events > DEFAULT_CAPACITY else
                   f"this mode's {settings.events:,}-event burst fits the default queue (the full run's 20,000 does "
                   "not). ")
                + "'lost' is from the server's records, 'dropped as queue_full' is ours' own count; they agree when "
                "nothing else was lost.", ""]
        rows = []
        for key, label in defaults:
            runs = results[key]["ours"]
            base = "tput0" if key.startswith("tput0") else "tput50"
            rate = med(runs, events_per_second)
            sdk_rate = med(results[base]["sdk"], events_per_second) if base in results else None
            rows.append((label, fmt(rate, 0), ratio(rate, sdk_rate),
                         f"{fmt(server_total(runs, 'delivered'))} of {fmt(server_total(runs, 'sent'))}",
                         fmt(server_total(runs, "lost")), fmt(dropped_queue_full(runs)), str(len(runs))))
        out += table(["latency", "events/s delivered", "ours/SDK events/s", "delivered (all runs)",
                      "lost (all runs, server)", "dropped as queue_full (all runs, ours' count)", "runs"], rows)

    # --- information: more requests in flight, and the setup's ceiling
    info = [(k, label) for k, label in INFO_VARIANTS if k in results]
    if info:
        out += ["", "### For information: more requests in flight, and the ceiling of this setup", "",
                f"Not used for the targets. The throughput scenario with `{ours_call}` plus `max_in_flight=8`, and "
                "a calibration without any Optimizely client: N threads, each with a keep-alive `requests.Session`, "
                "POSTing pre-encoded batches of 100 of the same events to the same server — about the most a Python "
                "sender using `requests` with N connections can get from this `FakeOdpServer` on this machine.", ""]
        rows = []
        for key, label in info:
            group = results[key]
            runs = next(iter(group.values()))
            rows.append((label, fmt(med(runs, events_per_second), 0),
                         f"{fmt(server_total(runs, 'lost'))} of {fmt(server_total(runs, 'sent'))}",
                         fmt(per_1000(runs, "requests"), 2), fmt(per_1000(runs, "connections"), 2),
                         fmt(cpu_per_10k(runs), 3), str(len(runs))))
        out += table(["variant", "events/s delivered", "lost (all runs)", "requests / 1,000", "connections / 1,000",
                      "CPU s / 10,000", "runs"], rows)

    # --- requests and connections
    out += ["", "## Requests and new TCP connections per 1,000 delivered events", "",
            "From the throughput runs (`server.requests`, `server.connection_count`).", ""]
    rows = []
    for key, label in (("tput0", "no added latency"), ("tput50", "50 ms per request")):
        if key not in results:
            continue
        group = results[key]
        for metric, name in (("requests", "requests / 1,000 events"),
                             ("connections", "new connections / 1,000 events")):
            sdk_v, ours_v = per_1000(group["sdk"], metric), per_1000(group["ours"], metric)
            rows.append((label, name, fmt(sdk_v, 2), fmt(ours_v, 2), ratio(ours_v, sdk_v)))
    out += table(["latency", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- memory
    mem_rows = []
    per_event: Dict[str, Optional[float]] = {}
    held_ok = True
    if "memory" in results:
        out += ["", "## Memory while events are held during an outage", "",
                f"After {settings.memory_warmup} delivered warm-up events, the server answers every request with "
                f"503 (`fail_for`); {settings.memory_events:,} events are sent (built on the fly, so everything they "
                "keep alive counts), then after 1 s the subprocess reads its peak RSS (`VmHWM` from "
                "/proc/self/status, reset before sending via /proc/self/clear_refs) against its RSS before sending. "
                "'Held' is what the sender actually keeps: ours `pending` from `odp_event_stats()`; the SDK its queue "
                "(capped at 1,000) plus its current batch — the rest of its events are dropped at once. Per 10,000 "
                "held is extrapolated from per held event for the SDK. Then the outage ends and each target drains "
                "and closes.", ""]
        data: Dict[str, Dict[str, Optional[float]]] = {}
        for t in TARGETS:
            runs = ok_runs(results["memory"][t])
            if not runs:
                data[t] = {}
                continue
            r = runs[0]
            s = r["sent"]
            growth = (s["hwm_kib"] if s.get("peak_reset") else s["rss1_kib"]) - s["rss0_kib"]
            held = s["held"]
            per = growth * 1024 / held if held else None
            per_event[t] = per
            data[t] = {"outage_sent": s["outage_sent"], "held": held, "growth": growth, "per": per,
                       "per10k": per * 10_000 / 1024 / 1024 if per is not None else None,
                       "delivered": r["server"]["delivered"], "lost": r["server"]["lost"],
                       "dup": r["server"]["duplicated"]}
            if t == "ours":
                from optimizely_odp_ext import Options

                bound = (r["sent"].get("effective_options") or {}).get("queue_capacity", Options().queue_capacity)
                held_ok = held <= bound
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
            mem_rows.append((name, fmt(int(sdk_v) if is_int and sdk_v is not None else sdk_v, digits),
                             fmt(int(ours_v) if is_int and ours_v is not None else ours_v, digits),
                             ratio(ours_v, sdk_v) if metric in ("growth", "per", "per10k", "held") else ""))
        out += table(["metric", "SDK", "ours", "ours/SDK"], mem_rows)

    # --- CPU
    out += ["", "## CPU seconds (process user + sys) per 10,000 events", "",
            "From the throughput runs: `time.process_time()` in the subprocess from the first send until "
            "`close()` returned, per 10,000 events delivered (the metric of issue 5) and per 10,000 calls made "
            "(the SDK drops most of its events, which inflates its per-delivered figure); and the CPU of the "
            "target's own background threads only (from /proc/self/task, before `close()`), per 10,000 delivered.",
            ""]
    rows = []
    for key, label in (("tput0", "no added latency"), ("tput50", "50 ms per request")):
        if key not in results:
            continue
        group = results[key]
        for name, fn in (("process CPU s / 10,000 delivered", cpu_per_10k),
                         ("process CPU s / 10,000 calls made", lambda rs: cpu_per_10k(rs, "sent")),
                         ("background threads CPU s / 10,000 delivered", background_cpu_per_10k)):
            sdk_v, ours_v = fn(group["sdk"]), fn(group["ours"])
            rows.append((label, name, fmt(sdk_v, 3), fmt(ours_v, 3), ratio(ours_v, sdk_v)))
    out += table(["latency", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- the spool (issue 4)
    if all(key in results for key in SPOOL_KEYS):
        out += spool_section(results, settings, ours_call)

    # --- targets
    def v(cond: bool, text: str, name: str) -> None:
        verdicts.append((name, cond, text))

    if 1 in caller and 4 in caller:
        p50 = {th: (caller[th]["ours"]["p50_us"], caller[th]["sdk"]["p50_us"]) for th in (1, 4)}
        cond = all(o is not None and s is not None and o <= s / 2 for o, s in p50.values())
        v(cond, "; ".join(f"{th} thread(s): ours {fmt(o, 2)} µs vs SDK {fmt(s, 2)} µs (ratio {ratio(o, s)})"
                          for th, (o, s) in p50.items()),
          f"Caller p50 at most half the SDK's (1 and 4 threads) [{target_label}]")
        p99 = caller[4]["ours"]["p99_us"]
        v(p99 is not None and p99 < 50, f"ours p99 with 4 threads: {fmt(p99, 2)} µs",
          f"Caller p99 under 50 µs with 4 threads [{target_label}]")
    if "tput50" in tput:
        rate = tput["tput50"].get("ours")
        no_loss = zero_loss["tput50"].get("ours", False)
        v(rate is not None and rate >= 5000 and no_loss,
          f"ours: {fmt(rate, 0)} events/s, zero loss: {'yes' if no_loss else 'NO'} "
          f"(lost {server_total(results['tput50']['ours'], 'lost')}, duplicated "
          f"{server_total(results['tput50']['ours'], 'duplicated')} over all runs)",
          f">= 5,000 events/s delivered with zero loss at 50 ms latency [{target_label}]")
    if "tput0" in tput:
        o, s = tput["tput0"].get("ours"), tput["tput0"].get("sdk")
        v(o is not None and s is not None and s > 0 and o >= 10 * s,
          f"ours {fmt(o, 0)} events/s vs SDK {fmt(s, 0)} events/s (ratio {ratio(o, s)})",
          f">= 10x the SDK's throughput with no added latency [{target_label}]")
    if "memory" in results:
        per = per_event.get("ours")
        v(per is not None and per < 1024 and held_ok,
          f"ours: {fmt(per, 0)} bytes per held event; held within queue_capacity: {'yes' if held_ok else 'NO'}",
          f"Memory per held event under 1 KB (and within the configured bound) [{defaults_label}]")
    out += ["", "## Targets (issue 5)", ""]
    out += [f"- **{'MET' if ok else 'NOT MET'}** — {name}: {text}." for name, ok, text in verdicts]
    for key, label in (("tput50_defaults", "50 ms latency"), ("tput0_defaults", "no added latency")):
        if key in results:
            runs = results[key]["ours"]
            base = "tput0" if key.startswith("tput0") else "tput50"
            sdk_rate = med(results[base]["sdk"], events_per_second) if base in results else None
            rate = med(runs, events_per_second)
            out += [f"- *For information, not judged* — {label} [{defaults_label}]: {fmt(rate, 0)} events/s "
                    f"(ratio to the SDK {ratio(rate, sdk_rate)}), lost {fmt(server_total(runs, 'lost'))} of "
                    f"{fmt(server_total(runs, 'sent'))}, of which ours counted {fmt(dropped_queue_full(runs))} as "
                    "queue_full" + (" — the burst is larger than the default queue, dropped by design."
                                    if settings.events > DEFAULT_CAPACITY else ".")]

    # --- raw
    out += ["", "## Raw per-run figures", "", "```"]
    out += [line.strip() for line in run["log"]]
    out += ["```", ""]
    return "\n".join(out), verdicts


PACED_MARGIN = 0.25  # seconds: "one request" on loopback, and the scheduling of a loaded machine


def paced_section(runs: Dict[str, List[Dict[str, Any]]], settings: Settings) -> List[str]:
    """Caller cost at a web app's pace (issue 12): floor, SDK and ours, as ratios, and delivery latency."""
    calls, seconds = settings.paced_calls, settings.paced_seconds
    out = ["", "## Caller cost at a web app's pace (issue 12)", "",
           f"1 thread, {calls:,} timed calls spread evenly over {seconds:g} s (one every "
           f"{seconds / calls * 1000:.1f} ms, sleeping in between as a request handler does), after "
           f"{settings.paced_warmup} untimed warm-up calls; healthy server, no added latency. **floor** = a plain "
           "function doing the same argument checks and a `deque.append`, at the same pace, in the same run "
           "(after an idle pause even that costs far more than in a burst: cold caches), so compare ratios. "
           "Targets run interleaved, each run in a fresh subprocess. Delivery latency = from the call to the "
           "server having read the request carrying that event.", ""]
    metric = {t: {m: med(runs.get(t, []), lambda r, m=m: r["sent"][m]) for m in ("p50_us", "p99_us", "max_us",
                                                                                     "mean_us")}
              for t in PACED_TARGETS}
    rows = []
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("max_us", "max"), ("mean_us", "mean")):
        f, sdk, ours = (metric[t][key] for t in PACED_TARGETS)
        rows.append((f"caller {label} (µs)", fmt(f, 2), fmt(sdk, 2), fmt(ours, 2), ratio(ours, f), ratio(ours, sdk)))

    def waited(target: str, key: str) -> Optional[float]:
        value = med(runs.get(target, []), lambda r: (r["server"].get("delivery_latency") or {}).get(key))
        return None if value is None else value * 1000

    for key, label in (("p50_s", "p50"), ("p99_s", "p99"), ("max_s", "max")):
        sdk, ours = waited("sdk", key), waited("ours", key)
        rows.append((f"delivery latency {label} (ms)", "", fmt(sdk, 0), fmt(ours, 0), "", ratio(ours, sdk)))
    for metric_name in ("lost", "duplicated"):
        rows.append((f"events {metric_name} (all runs)", "", fmt(server_total(runs.get("sdk", []), metric_name)),
                     fmt(server_total(runs.get("ours", []), metric_name)), "", ""))
    out += table(["metric", "floor", "SDK", "ours", "ours/floor", "ours/SDK"], rows)
    # Noise: the ratios run by run (run i of each target ran back to back).
    per_run = []
    for f_run, s_run, o_run in zip(*(runs.get(t, []) for t in PACED_TARGETS)):
        if f_run.get("ok") and s_run.get("ok") and o_run.get("ok"):
            per_run.append(f"{ratio(o_run['sent']['p50_us'], f_run['sent']['p50_us'])} / "
                           f"{ratio(o_run['sent']['p50_us'], s_run['sent']['p50_us'])} / "
                           f"{ratio(o_run['sent']['p99_us'], s_run['sent']['p99_us'])}")
    if per_run:
        out += ["", "Run by run, p50 ours/floor / p50 ours/SDK / p99 ours/SDK: " + "; ".join(per_run) + "."]
    interval = float(effective_options({"paced": runs}, "paced").get("flush_interval", 1.0))
    f50, s50, o50 = (metric[t]["p50_us"] for t in PACED_TARGETS)
    s99, o99 = metric["sdk"]["p99_us"], metric["ours"]["p99_us"]
    worst = waited("ours", "max_s")
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
    out += ["", "Targets of issue 12:", ""]
    out += [f"- **{'MET' if ok else 'NOT MET'}** — {text}." for ok, text in checks]
    return out


def spool_section(results: Dict[str, Dict[str, List[Dict[str, Any]]]], settings: Settings,
                  ours_call: str) -> List[str]:
    """The table of the spool section: memory only vs spool_dir vs spool_dir + spool_fsync, and a summary."""
    names = [v for v, _, _ in SPOOL_VARIANTS]
    disks = [r["spool_disk"] for key in SPOOL_KEYS for v in names for r in ok_runs(results[key][v])
             if r.get("spool_disk")]
    where = disks[0]["filesystem"] if disks else "unknown"
    fewer = settings.spool_repeats < settings.repeats
    out = ["", "## Spool: cost on the caller and on throughput (issue 4)", "",
           f"ours = `{ours_call}` (memory only), against the same call plus `spool_dir=<dir>` and plus "
           "`spool_dir=<dir>, spool_fsync=True`, where `<dir>` is a fresh temporary directory for every run, removed "
           f"after it (filesystem: {where}). The three variants run interleaved, each run in a fresh subprocess, "
           f"{settings.spool_repeats} run(s) per variant and scenario"
           + (f" (fewer than the {settings.repeats} of the other sections, to keep the full run short)" if fewer
              else "")
           + "; figures are medians over the runs, loss columns totals. Caller cost: as above, 1 thread, "
           f"{settings.caller_calls:,} timed calls after {settings.caller_warmup:,} untimed ones. Throughput: as "
           f"above, {settings.events:,} events from one caller thread, then `flush_odp_events()`. 'Bytes written "
           "per event' is the worker process's `wchar` from `/proc/self/io` (bytes passed to `write()` on files "
           "and pipes — the spool's records and acknowledgement indexes; socket sends are not counted) from the "
           "first send until `flush_odp_events()` returned, per event sent. 'Peak spool size' is the directory's "
           f"size sampled every {SPOOL_SAMPLE_SECONDS * 1000:.0f} ms by the benchmark's parent process (segments "
           "are deleted once every record in them is delivered). Ratio = variant / memory only. "
           "Loss and duplicates are counted from the server's records.", ""]

    def per_run(runs: List[Dict[str, Any]], fn: Callable[[Dict[str, Any]], Optional[float]]) -> Optional[float]:
        return med(runs, fn)

    def io_per_event(field: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], Optional[float]]:
        def one(r: Dict[str, Any]) -> Optional[float]:
            io = r["sent"].get("io") or {}
            sent = r["sent"].get("sent")
            return io[field] * scale / sent if field in io and sent else None
        return one

    def disk(field: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], Optional[float]]:
        def one(r: Dict[str, Any]) -> Optional[float]:
            found = r.get("spool_disk")
            return found[field] * scale if found else None
        return one

    rows: List[Tuple[str, ...]] = []
    medians: Dict[Tuple[str, str], Dict[str, Optional[float]]] = {}

    def add(setting: str, metric: str, key: str, fn: Callable[[List[Dict[str, Any]]], Optional[float]],
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
    for metric, label in (("p50_us", "p50"), ("p99_us", "p99"), ("max_us", "max"), ("mean_us", "mean")):
        add(caller_label, label, "spool_caller1", lambda runs, m=metric: per_run(runs, lambda r: r["sent"][m]), 2)
    for metric in ("lost", "duplicated"):
        add(caller_label, f"events {metric} (all runs)", "spool_caller1",
            lambda runs, m=metric: server_total(runs, m), 0, with_ratio=False)
    for key, label in (("spool_tput0", "throughput, no added latency"),
                       ("spool_tput50", f"throughput, {settings.latency * 1000:.0f} ms per request")):
        sent_total = server_total(results[key]["memory"], "sent")
        add(label, "events/s delivered", key, lambda runs: med(runs, events_per_second), 0)
        add(label, "caller's send loop (s)", key, lambda runs: med(runs, send_seconds), 3)
        add(label, "first send to last event recorded (s)", key, lambda runs: med(runs, span_seconds), 2)
        for metric in ("delivered", "lost", "duplicated"):
            add(label, f"{metric} (all runs, of {fmt(sent_total)} sent)", key,
                lambda runs, m=metric: server_total(runs, m), 0, with_ratio=False)
        add(label, "process CPU s / 10,000 delivered", key, cpu_per_10k, 3)
        add(label, "bytes written per event (wchar)", key, lambda runs: per_run(runs, io_per_event("wchar")), 0,
            with_ratio=False)
        add(label, "write() calls per 1,000 events", key,
            lambda runs: per_run(runs, io_per_event("syscw", 1000.0)), 1, with_ratio=False)
        add(label, "peak spool size (KiB)", key, lambda runs: per_run(runs, disk("peak_bytes", 1 / 1024)), 0,
            with_ratio=False, memory_na=True)
        add(label, "left in the spool after close (bytes, all runs)", key,
            lambda runs: total(runs, lambda r: int((r.get("spool_disk") or {}).get("left_bytes", 0))), 0,
            with_ratio=False, memory_na=True)
    header = ["setting", "metric"]
    for v, label, _ in SPOOL_VARIANTS:
        header.append(f"ours {label}")
        if v != "memory":
            header.append(f"{v} / memory")
    out += table(header, rows)

    # A one-paragraph reading of the table (the same numbers).
    def value(key: str, metric: str, variant: str) -> Optional[float]:
        return medians.get((key, metric), {}).get(variant)

    losses = {v: sum(int(server_total(results[k][v], "lost") or 0) + int(server_total(results[k][v], "duplicated")
                                                                         or 0) for k in SPOOL_KEYS) for v in names}
    parts = []
    for v, label, _ in SPOOL_VARIANTS[1:]:
        p50 = (value("spool_caller1", "p50", "memory"), value("spool_caller1", "p50", v))
        p99 = (value("spool_caller1", "p99", "memory"), value("spool_caller1", "p99", v))
        t0 = (value("spool_tput0", "events/s delivered", "memory"), value("spool_tput0", "events/s delivered", v))
        t50 = (value("spool_tput50", "events/s delivered", "memory"), value("spool_tput50", "events/s delivered", v))
        parts.append(f"`{label.lstrip('+ ')}`: caller p50 {fmt(p50[1], 2)} µs vs {fmt(p50[0], 2)} µs "
                     f"({ratio(p50[1], p50[0])}), p99 {fmt(p99[1], 1)} vs {fmt(p99[0], 1)} µs "
                     f"({ratio(p99[1], p99[0])}); "
                     f"throughput {fmt(t0[1], 0)} vs {fmt(t0[0], 0)} events/s with no added latency "
                     f"({ratio(t0[1], t0[0])}) and {fmt(t50[1], 0)} vs {fmt(t50[0], 0)} at "
                     f"{settings.latency * 1000:.0f} ms ({ratio(t50[1], t50[0])}); lost + duplicated over all its "
                     f"runs: {fmt(losses[v])}")
    out += ["", "Reading (medians, with the spool vs memory only): " + "; ".join(parts) + "."]
    return out


INFO_VARIANTS = (
    ("tput0_mif8", "ours, queue_capacity=25,000 + max_in_flight=8 — no added latency"),
    ("ceil0_4", "ceiling: bare requests, 4 connections — no added latency"),
    ("ceil0_8", "ceiling: bare requests, 8 connections — no added latency"),
    ("tput50_mif8", "ours, queue_capacity=25,000 + max_in_flight=8 — 50 ms"),
    ("ceil50_4", "ceiling: bare requests, 4 connections — 50 ms"),
    ("ceil50_8", "ceiling: bare requests, 8 connections — 50 ms"),
)


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
    ``bench_worker.py`` and its table in :func:`report`.
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
