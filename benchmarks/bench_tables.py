"""The benchmark's table writer: figures derived from the runs, the machine, markdown tables (a section's
``heading``; ``versus_rows`` and ``versus_table`` for the side-by-side SDK / ours / ratio tables), and
writing ``RESULTS.md`` (keeping the section ``import_bench.py`` writes between its markers).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench_harness import ROOT

# ----------------------------------------------------------------------------- derived figures

# The caller-cost figures each worker reports, and their labels in the tables.
CALLER_METRICS = (("p50_us", "p50"), ("p99_us", "p99"), ("max_us", "max"), ("mean_us", "mean"))


def span_seconds(result: Dict[str, Any]) -> Optional[float]:
    t_last = result["server"]["t_last_event"] if result.get("ok") else None
    return None if t_last is None else t_last - result["sent"]["t_first"]


def median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ok_runs(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in runs if r.get("ok")]


def med(runs: List[Dict[str, Any]], getter: Callable[[Dict[str, Any]], Optional[float]]) -> Optional[float]:
    return median([getter(r) for r in ok_runs(runs)])


def total(runs: List[Dict[str, Any]], getter: Callable[[Dict[str, Any]], int]) -> Optional[int]:
    good = ok_runs(runs)
    return sum(getter(r) for r in good) if good else None


def server_total(runs: List[Dict[str, Any]], key: str) -> Optional[int]:
    """A count summed over the good runs: ``sent`` from the worker, anything else from the server."""
    good = ok_runs(runs)
    if not good:
        return None
    return sum(int(r["sent"]["sent"] if key == "sent" else r["server"][key]) for r in good)


def lossless(runs: List[Dict[str, Any]]) -> bool:
    good = ok_runs(runs)
    return bool(good) and len(good) == len(runs) and all(
        r["server"]["lost"] == 0 and r["server"]["duplicated"] == 0 for r in good)


def send_seconds(result: Dict[str, Any]) -> Optional[float]:
    value = result["sent"].get("send_seconds")
    return None if value is None else float(value)


def per_1000(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    def one(r: Dict[str, Any]) -> Optional[float]:
        delivered = r["server"]["delivered"]
        return r["server"][key] * 1000 / delivered if delivered else None
    return med(runs, one)


def cpu_per_10k(runs: List[Dict[str, Any]], per: str = "delivered") -> Optional[float]:
    """Process CPU per 10,000 events ``delivered`` (server) or ``sent`` (calls made)."""
    def one(r: Dict[str, Any]) -> Optional[float]:
        cpu = r["final"].get("cpu_seconds")
        count = r["server"]["delivered"] if per == "delivered" else r["sent"]["sent"]
        return cpu * 10_000 / count if cpu is not None and count else None
    return med(runs, one)


def background_cpu_per_10k(runs: List[Dict[str, Any]]) -> Optional[float]:
    """CPU of the target's own threads (everything but the caller's) per 10,000 delivered events."""
    def one(r: Dict[str, Any]) -> Optional[float]:
        threads = r["final"].get("thread_cpu_before_close") or {}
        cpu = sum(seconds for name, seconds in threads.items() if name != "main")
        delivered = r["server"]["delivered"]
        return cpu * 10_000 / delivered if threads and delivered else None
    return med(runs, one)


def sent_field(name: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """A run's figure ``name`` as its worker reported it (``p50_us``, ``send_seconds``, ...)."""
    return lambda r: r["sent"][name]


def median_of(getter: Callable[[Dict[str, Any]], Optional[float]]) -> Callable[[List[Dict[str, Any]]], Optional[float]]:
    """The figure ``getter`` reads from one run, as the median over the good runs of a group (:func:`med`)."""
    return lambda runs: med(runs, getter)


def summed(key: str) -> Callable[[List[Dict[str, Any]]], Optional[float]]:
    """The count ``key`` summed over the good runs of a group (:func:`server_total`)."""
    return lambda runs: server_total(runs, key)


def caller_medians(runs: List[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """The medians over the good runs of each caller-cost figure (``p50_us`` ... ``mean_us``)."""
    return {m: med(runs, sent_field(m)) for m, _ in CALLER_METRICS}


def delivery_ms(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    """The median over the runs of one delivery-latency figure (``p50_s``, ``p99_s``, ``max_s``), in ms."""
    value = med(runs, lambda r: (r["server"].get("delivery_latency") or {}).get(key))
    return None if value is None else value * 1000


def io_per_event(field: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], Optional[float]]:
    """A run's ``/proc/self/io`` counter ``field`` (times ``scale``) per event sent."""
    def one(r: Dict[str, Any]) -> Optional[float]:
        io = r["sent"].get("io") or {}
        sent = r["sent"].get("sent")
        return io[field] * scale / sent if field in io and sent else None
    return one


def spool_disk_figure(field: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], Optional[float]]:
    """A run's spool-directory figure ``field`` (times ``scale``), sampled by the parent process."""
    def one(r: Dict[str, Any]) -> Optional[float]:
        found = r.get("spool_disk")
        return found[field] * scale if found else None
    return one


def effective_options(results: Dict[str, Dict[str, List[Dict[str, Any]]]], key: str) -> Dict[str, Any]:
    """The options ours ran with in scenario ``key``, as the worker read them back (empty when unknown)."""
    for r in ok_runs(results.get(key, {}).get("ours", [])):
        found = r["sent"].get("effective_options")
        if found:
            return dict(found)
    return {}


def describe_options(options: Dict[str, Any]) -> str:
    """``queue_capacity 25,000, max_in_flight 4, ...`` for the options that matter to these scenarios."""
    parts = []
    for name in ("queue_capacity", "max_in_flight", "batch_size", "flush_interval", "overflow", "gzip"):
        if name in options:
            value = options[name]
            parts.append(f"{name} {fmt(value) if type(value) is int else value}")
    return ", ".join(parts)


def dropped_queue_full(runs: List[Dict[str, Any]]) -> Optional[int]:
    """Ours' own count of events dropped as queue_full (odp_event_stats() before close), over the runs."""
    return total(runs, lambda r: int(((r.get("final") or {}).get("stats_before_close", {}).get("dropped") or {})
                                     .get("queue_full", 0)))


def fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def ratio(ours: Optional[float], sdk: Optional[float]) -> str:
    if ours is None or sdk is None or sdk == 0:
        return "n/a"
    value = ours / sdk
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


# ----------------------------------------------------------------------------- the machine, tables, the file


def load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "unknown"


def peak_load(rows: Sequence[Sequence[str]]) -> Tuple[Optional[float], int]:
    """From :func:`machine`'s rows: the highest load average seen (None if unknown), and the usable CPUs (0)."""
    loads = [float(x) for k, v in rows if k.startswith("load average") for x in v.replace("/", " ").split()
             if x.replace(".", "", 1).isdigit()]
    cpus = next((int(v) for k, v in rows if k.startswith("nproc") and v.isdigit()), 0)
    return (max(loads) if loads else None), cpus


def machine(load_before: str) -> List[Tuple[str, str]]:
    from importlib import metadata

    import optimizely_odp_ext

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        sdk_version = metadata.version("optimizely-sdk")
    except metadata.PackageNotFoundError:
        sdk_version = "not installed"
    return [
        ("nproc (usable CPUs)", str(usable)),
        ("CPU model", model),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("optimizely-sdk", sdk_version),
        ("optimizely-odp-ext", f"{optimizely_odp_ext.__version__} (commit {commit}; working tree as run)"),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
        ("load average (1, 5, 15 min) before / after the run", f"{load_before} / {load_average()}"),
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def heading(title: str, text: str, level: int = 2) -> List[str]:
    """A section's opening: a blank line, its title, and the paragraph saying what was measured and how."""
    return ["", f"{'#' * level} {title}", "", text, ""]


def versus(sdk: Optional[float], ours: Optional[float], digits: int = 1,
           with_ratio: bool = True) -> Tuple[str, str, str]:
    """The SDK, ours and ours/SDK cells of a side-by-side row."""
    return fmt(sdk, digits), fmt(ours, digits), ratio(ours, sdk) if with_ratio else ""


def versus_rows(setting: str, group: Dict[str, List[Dict[str, Any]]],
                metrics: Sequence[Tuple[str, Callable[[List[Dict[str, Any]]], Optional[float]], int]],
                with_ratio: bool = True) -> List[Tuple[str, ...]]:
    """A row per (metric name, figure over the runs, digits): the figure for the SDK's runs and for ours."""
    return [(setting, name, *versus(figure(group["sdk"]), figure(group["ours"]), digits, with_ratio))
            for name, figure, digits in metrics]


def versus_table(first: str, rows: Sequence[Sequence[str]]) -> List[str]:
    """The side-by-side table: ``first`` (the setting), the metric, SDK, ours, ours/SDK."""
    return table([first, "metric", "SDK", "ours", "ours/SDK"], rows)


def verdict_line(ok: bool, text: str) -> str:
    return f"- **{'MET' if ok else 'NOT MET'}** — {text}."


# import_bench.py writes its own section into the same file, between these markers; run.py keeps it.
IMPORT_BEGIN, IMPORT_END = "<!-- import-benchmark:begin -->", "<!-- import-benchmark:end -->"
# Sections other scripts write into the results file, kept when run.py rewrites the rest.
KEPT_SECTIONS = ((IMPORT_BEGIN, IMPORT_END), ("<!-- lean-benchmark:begin -->", "<!-- lean-benchmark:end -->"),
                 ("<!-- adaptive-benchmark:begin -->", "<!-- adaptive-benchmark:end -->"))


def write_results(text: str, path: str) -> None:
    """Writes ``text`` to ``path``, keeping the sections the other scripts wrote there (KEPT_SECTIONS)."""
    try:
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
    except FileNotFoundError:
        old = ""
    kept = ""
    for begin, end in KEPT_SECTIONS:
        if begin in old and end in old:
            kept += "\n" + old[old.index(begin):old.index(end) + len(end)] + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + kept)
