"""Shared helpers of keepkv's benchmark tools (``tools/bench_*.py``, ``tools/perf_report.py``).

The tools import it as ``import bench_common``: ``python tools/x.py`` puts the script's own folder (``tools/``)
first on the import path, and keepkv is imported as the installed package (``pip install -e .``).

- :func:`machine_facts`: CPU model, cores, threads, memory, torch / python / keepkv versions (goes in every JSON);
- :func:`copy_bandwidth`: the machine's measured memory copy bandwidth (``torch.Tensor.copy_`` of a 512 MB buffer,
  bytes read + written / time, median of runs) — the denominator of the "fraction of the bandwidth bound";
- :func:`read_bandwidth`: the read-only stream rate (``sum`` of a 512 MB buffer), reported beside it;
- :func:`median_time`: median wall time of a callable over ``runs`` after ``warmup`` calls;
- :func:`record_round`: one engine's result of a timed round (warm-up dropped, load average kept);
- :func:`write_json`, :func:`write_rows`, :func:`print_row`, :func:`save_figure`, :func:`rss_bytes`,
  :func:`peak_rss_bytes`.

Every timed run is meant to run under ``flock /tmp/keepkv-cpu.lock`` with ``OMP_NUM_THREADS`` set.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "bench"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_vector_isa() -> dict:
    """The vector instruction sets the kernels can use: torch's CPU capability (``AVX2``, ``AVX512``, ...) and the
    AVX-512 / AMX flags of ``/proc/cpuinfo`` (``None`` where the file or its flags line cannot be read): two hosts
    with one model name (``AMD EPYC``) can differ here, and bf16 speed depends on it."""
    flags: list[str] | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = sorted({f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx"))})
                break
    except OSError:
        pass
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "avx512_amx_flags": flags}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine_facts() -> dict:
    """What the numbers were measured on (machine, threads, versions)."""
    import keepkv

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_model(),
        **cpu_vector_isa(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_gib": round(mem / 2**30, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "keepkv": getattr(keepkv, "__version__", "unknown"),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def median_time(fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """``(median seconds, all run times)`` of ``fn()`` over ``runs`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def copy_bandwidth(megabytes: int = 512, runs: int = 7) -> float:
    """Measured copy bandwidth in bytes/s: ``2 * size / t`` for ``dst.copy_(src)`` (read + write), median of runs.

    A decode step streams its weights and KV once (reads dominate), so this is the practical ceiling of bytes
    moved per second for the benchmarked process at its thread count.
    """
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds, _ = median_time(lambda: dst.copy_(src), runs=runs, warmup=2)
    return 2 * src.numel() * src.element_size() / seconds


def read_bandwidth(megabytes: int = 512, runs: int = 7) -> float:
    """Measured read bandwidth in bytes/s: ``size / t`` for ``src.sum()`` (a vectorised, memory-bound read of
    every byte once, nothing written back), median of runs. Reported beside :func:`copy_bandwidth` (on this
    project's Intel machine: 23.6 vs 25.6 GB/s, one reduction stream being no faster than a copy)."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32)
    seconds, _ = median_time(lambda: src.sum(), runs=runs, warmup=2)
    return src.numel() * src.element_size() / seconds


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    """``VmHWM`` from ``/proc/self/status`` (peak RSS since the last :func:`reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_rows(name: str, benchmark: str, runs: int, rows: list[dict]) -> Path:
    """A table of measured rows as ``results/bench/<name>``, with the machine's facts and the number of runs."""
    return write_json(name, {"benchmark": benchmark, "machine": machine_facts(), "runs": runs, "rows": rows})


def record_round(runs: dict[str, list[dict]], key: str, round_index: int, rounds: int, result: dict,
                 line: str) -> None:
    """One engine's result in round ``round_index`` of ``rounds`` (round 0 is the warm-up and is not kept): the
    1-minute load average after it goes into the result (above the thread count, something else ran), and
    ``line`` is printed after the round's tag."""
    result["loadavg_1m_after"] = os.getloadavg()[0]
    tag = "warm-up" if round_index == 0 else f"run {round_index}/{rounds}"
    print(f"  [{tag}] {key:28s} {line}", flush=True)
    if round_index > 0:
        runs[key].append(result)


def print_row(row: dict, digits: int = 3) -> None:
    """One measured row as a JSON line (floats rounded to ``digits``), flushed so progress shows as it runs."""
    print(json.dumps({k: (round(v, digits) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay out, write (the folder made if needed) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def read_json(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
