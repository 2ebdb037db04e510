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
``import_bench.py``'s section), ``bench_report.py`` (the results file's sections, one function each, listed
in ``SECTIONS``, joined by ``report()``), ``bench_worker.py`` (what runs in each subprocess), and this file:
the scenarios (:func:`plan`, :class:`Bench`) and the command. ``--only NAMES`` runs some scenarios again and
updates their figures in the last run's results.

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
    DEFAULTS_CALL,
    HERE,
    MORE_IN_FLIGHT,
    OURS_CALL,
    OURS_OPTIONS,
    PACED_PAIRED,
    PACED_TARGETS,
    SPOOL_KEYS,
    SPOOL_VARIANTS,
    TARGETS,
    DirSampler,
    FakeOdpServer,
    Runner,
    Settings,
    dir_usage,
    filesystem_of,
    run_one,
    summary,
)
from bench_report import Group, report
from bench_tables import (
    load_average,
    machine,
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
                           (*PACED_TARGETS, PACED_PAIRED), s.paced_repeats)

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and one run per scenario (~1 minute)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per caller-cost and throughput scenario (default 3, quick 1)")
    parser.add_argument("--no-info", action="store_true",
                        help="skip the informational runs (all defaults, max_in_flight=8, calibration ceiling)")
    parser.add_argument("--spool-repeats", type=int, default=None,
                        help="runs per scenario and variant in the spool section (default: as --repeats)")
    parser.add_argument("--paced-repeats", type=int, default=None,
                        help="runs per target in the paced section (default: at least 7, or as --repeats with --quick)")
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
    settings = Settings(args.quick, args.repeats, args.spool_repeats, args.paced_repeats)
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
           "paced_repeats": settings.paced_repeats,
           "command": command, "ours_options": OURS_OPTIONS,
           "elapsed": elapsed, "machine": machine(load_before), "log": bench.log, "results": results}
    return write_report(run, args.output, raw_path, args.strict)



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
