"""Shared by the PyTorch reference benchmarks in bench/pytorch: thread setup that must run
before `import torch`, and the one machine-readable result line bench/run.sh parses.

For: bench_train.py, bench_encoder.py, bench_encoder_train.py, bench_e2e.py.
Not for: anything levi itself runs (levi has no Python dependency).

The result line is the same protocol as bench/bench_common.h on levi's side:
  BENCH case=<a|b|c|d> side=torch threads=<T> unit=<u> value=<v> gflops=<g> maxrss_mib=<m>
        cpu_wall=<c> [key=value ...]
"""
import os
import resource


def setup_threads(threads):
    """Make OpenBLAS and OpenMP agree with torch's intra-op thread count. Must run before
    `import torch`: both libraries read the variables when they are loaded. run.sh sets them
    already (and OMP_WAIT_POLICY=PASSIVE at 2 threads, so idle OpenMP workers sleep instead of
    spinning against OpenBLAS's threads); these defaults cover a script run by hand."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def maxrss_mib():
    """Peak resident set of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def result(case, threads, unit, value, gflops, cpu_wall, **extra):
    fields = [f"BENCH case={case} side=torch threads={threads} unit={unit} value={value:.4g}",
              f"gflops={gflops:.2f} maxrss_mib={maxrss_mib():.1f} cpu_wall={cpu_wall:.2f}"]
    fields += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()]
    print(" ".join(fields), flush=True)
