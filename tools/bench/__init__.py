"""PlugKit's benchmark runner: ``python -m tools.bench [technique ...]`` (or ``make bench``).

Each technique has ``tools/bench/<technique>.py`` with ``run(ctx) -> str`` returning a markdown section.
Cases are timed alternately in one run (A B C A B C ...), one warm-up each, and reported as medians
and ratios, so machine noise hits every case alike. Results go to stdout and ``out/bench.md``.
Benchmarks are never tests: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tools.harness.host import REPO, setup_in_process

log = logging.getLogger(__name__)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def rss_growth(fn: Callable[[], Any]) -> int:
    """Growth of this process's resident memory during ``fn``, polled every 5 ms (CPU peak memory)."""
    import threading

    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0] - base, 0)


class BenchContext:
    def __init__(self, repeats: int = 5):
        self.repeats = repeats
        self._sd15 = None
        setup_in_process()

    # -- models ----------------------------------------------------------------------------
    def sd15_full(self):
        """(model, clip, vae) from the random-weight full-size SD1.5 checkpoint (loaded once)."""
        if self._sd15 is None:
            import comfy.sd

            from tools.fixtures.models import ensure_random_sd15_checkpoint

            out = comfy.sd.load_checkpoint_guess_config(str(ensure_random_sd15_checkpoint()),
                                                        output_vae=True, output_clip=True)
            self._sd15 = (out[0], out[1], out[2])
        return self._sd15

    # -- timing ----------------------------------------------------------------------------
    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def alternate(self, cases: dict[str, Callable[[], Any]], repeats: int | None = None) -> dict[str, list[float]]:
        """Seconds per call of each case, measured alternately after one warm-up each."""
        repeats = repeats or self.repeats
        for fn in cases.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                gc.collect()
                self._sync()
                t0 = time.perf_counter()
                fn()
                self._sync()
                times[name].append(time.perf_counter() - t0)
        return times

    @staticmethod
    def median(xs: list[float]) -> float:
        return statistics.median(xs)

    def peak_memory(self, fn: Callable[[], Any]) -> int:
        """Peak bytes during ``fn``: CUDA peak allocation, or growth of the process's peak RSS on CPU."""
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            return torch.cuda.max_memory_allocated() - base
        return rss_growth(fn)

    @staticmethod
    def ratio_table(rows: list[tuple[str, float]], baseline: str, unit: str = "s") -> str:
        """A markdown table of (case, value) with each value's ratio to the baseline case."""
        base = dict(rows)[baseline]
        lines = [f"| case | median ({unit}) | ratio to {baseline} |", "|---|---:|---:|"]
        for name, value in rows:
            ratio = value / base if base else float("nan")
            lines.append(f"| {name} | {value:.4f} | {ratio:.3f}x |")
        return "\n".join(lines)


HELPERS = {"live_tensors"}  # modules here that are not benchmarks


def discover() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                  if not p.stem.startswith("_") and p.stem not in HELPERS)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("techniques", nargs="*", help=f"subset of {discover()}")
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("PLUGKIT_BENCH_REPEATS", 5)))
    args = parser.parse_args(argv)
    names = args.techniques or discover()
    unknown = set(names) - set(discover())
    if unknown:
        parser.error(f"no benchmark named {sorted(unknown)}; have {discover()}")
    ctx = BenchContext(repeats=args.repeats)
    import torch

    sections = [
        "# PlugKit benchmarks",
        f"Device: {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.repeats} repeats, medians.",
    ]
    for name in names:
        log.info("== benchmark: %s", name)
        module = importlib.import_module(f"tools.bench.{name}")
        sections.append(module.run(ctx))
    text = "\n\n".join(sections) + "\n"
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    (out / "bench.md").write_text(text)
    sys.stdout.write(text)
    log.info("written to %s", out / "bench.md")
    return 0
