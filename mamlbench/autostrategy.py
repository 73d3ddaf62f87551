"""`strategy: auto` by measurement: time each eligible strategy for a few meta-steps on the run's own
batch shapes and keep the fastest.

A fixed rule (`core.choose_strategy`: compiled on CUDA, the per-task loop for conv nets on the CPU) is
wrong on some workloads (issue 17: the compiled task-batched step was 1.40x the loop on Omniglot 5-way
1-shot with one query per class on this CPU). So a run of `train.probe_min_iterations` or more
probes loop and vmap, and from `train.compile_min_iterations` (long enough to repay compiling)
compiled too: on the real learner and a real batch, each strategy gets one warm-up meta-step (which
for `compiled` includes compilation, reported apart) and `steps` timed ones, with a throwaway optimiser;
the learner's weights and buffers are restored afterwards and torch's RNG is forked, so the run's
trajectory starts exactly where it would have. A strategy that runs out of memory, or exceeds
`memory_fraction` of the device's memory, is out. The choice is cached per (device, torch version,
variant, model, batch shapes, options) in `<cache>/strategy.json`, so reruns skip the probe, and the
caller stores it in the checkpoint, so a resume keeps it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from mamlbench.io import write_json

CANDIDATES = ("loop", "vmap", "compiled")
CACHE_ENV = "MAMLBENCH_CACHE_DIR"


def cache_dir() -> Path:
    """$MAMLBENCH_CACHE_DIR, else ~/.cache/mamlbench."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mamlbench")


def persistent_compile_cache() -> None:
    """torch.compile's caches under <cache>/inductor unless TORCHINDUCTOR_CACHE_DIR says otherwise: its
    default (/tmp/torchinductor_<user>) is gone after a reboot, and a DVC stage would compile anew."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def eligible(learner, candidates=None) -> list[str]:
    """Strategies this learner honours: MAML's own forward (MAML, first-order MAML, ANIL, Meta-SGD, BOIL...)
    runs all three (compiled where `fast.py` serves the learner); a variant with its own forward runs one."""
    from mamlbench.algorithms import fast
    from mamlbench.algorithms.maml import MAML
    if not isinstance(learner, MAML) or type(learner).forward is not MAML.forward:
        return []
    return [s for s in (CANDIDATES if candidates is None else candidates)
            if s != "compiled" or fast.unsupported(learner) is None]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def cache_key(learner, batch, device: torch.device, variant: str, candidates=(),
              max_memory_ratio: float | None = None) -> str:
    shapes = [tuple(t.shape) for t in batch]
    parts = [device_name(device), torch.__version__, variant, repr(learner.model), shapes, sorted(candidates),
             max_memory_ratio,
             learner.first_order, learner.inner_steps, getattr(learner, "precision", "fp32"),
             getattr(learner, "checkpointing", False)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _rss(field: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak(device: torch.device) -> int | None:
    """Start a peak-memory window; the level it starts from (CUDA: allocated bytes; CPU: resident bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # what glibc kept from the strategy before goes back first
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM back to the current RSS
    except OSError:
        return None
    return _rss("VmRSS")


def _peak(device: torch.device, start: int | None) -> int | None:
    if start is None:
        return None
    top = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")
    return None if top is None else max(0, top - start)


def _memory_limit(device: torch.device, fraction: float) -> int | None:
    if device.type == "cuda":
        return int(fraction * torch.cuda.get_device_properties(device).total_memory)
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return None if available is None else int(fraction * available)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(learner, batch, step: Callable, device: torch.device, *, steps: int = 3,
          memory_fraction: float = 0.9, candidates=None) -> dict[str, dict]:
    """{strategy: {"warmup_s", "step_s" (median), "peak_bytes"} or {"error"}} for each eligible one
    of `candidates` (default `CANDIDATES`).

    `peak_bytes`: the rise of torch's allocated bytes (CUDA) or of the resident set (CPU, Linux: glibc
    trimmed first; approximate) over the timed steps; above `memory_fraction` of the device's memory
    (CUDA) or of the memory available (CPU) the strategy is out.

    `step(learner, optimizer, batch)` runs one meta-update; the optimiser is a fresh Adam each time.
    """
    saved = copy.deepcopy(learner.state_dict())
    before = learner.strategy
    results: dict[str, dict] = {}
    limit = _memory_limit(device, memory_fraction)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for strategy in eligible(learner, candidates):
                learner.strategy = strategy
                optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)   # real steps: the restore below matters
                try:
                    start = time.perf_counter()
                    step(learner, optimizer, batch)
                    _sync(device)
                    warmup = time.perf_counter() - start
                    level, times = _reset_peak(device), []
                    for _ in range(steps):
                        start = time.perf_counter()
                        step(learner, optimizer, batch)
                        _sync(device)
                        times.append(time.perf_counter() - start)
                    result = {"warmup_s": round(warmup, 4), "step_s": round(statistics.median(times), 5)}
                    peak = _peak(device, level)
                    if peak is not None:
                        result["peak_bytes"] = peak
                        if limit is not None and peak > limit:
                            result["error"] = f"peak memory {peak / 2**20:.0f} MiB > {memory_fraction:g} of what is free"
                except (torch.cuda.OutOfMemoryError, MemoryError) as err:
                    result = {"error": f"out of memory ({str(err).splitlines()[0] if str(err) else type(err).__name__})"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results[strategy] = result
                learner.load_state_dict(saved)
    finally:
        learner.strategy = before
        learner.load_state_dict(saved)
    return results


def fastest(results: dict[str, dict], max_memory_ratio: float | None = None) -> str:
    """The fastest strategy that ran; with `max_memory_ratio`, among those whose peak memory is within
    that multiple of the lowest peak measured (the loop's, as a rule): speed bought with memory, capped."""
    ok = {s: r for s, r in results.items() if "error" not in r}
    if not ok:
        raise RuntimeError(f"strategy probe: every strategy failed ({results})")
    peaks = [r["peak_bytes"] for r in ok.values() if r.get("peak_bytes")]
    if max_memory_ratio is not None and peaks:
        cap = max_memory_ratio * min(peaks)
        ok = {s: r for s, r in ok.items() if r.get("peak_bytes", 0) <= cap}
    return min(ok, key=lambda s: (ok[s]["step_s"], ("loop", "vmap", "compiled").index(s)))   # ties: least memory


def choose(learner, batch, step: Callable, device: torch.device, variant: str, *, steps: int = 3,
           cache: Path | None = None, candidates=None, max_memory_ratio: float | None = None) -> dict:
    """{"choice", "timings", "cached", "key"}: the cached choice for this key, else a fresh probe (cached)."""
    candidates = CANDIDATES if candidates is None else candidates
    key = cache_key(learner, batch, device, variant, candidates, max_memory_ratio)
    path = (cache or cache_dir()) / "strategy.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key in known:
        return {**known[key], "cached": True, "key": key}
    timings = probe(learner, batch, step, device, steps=steps, candidates=candidates)
    entry = {"choice": fastest(timings, max_memory_ratio), "timings": timings, "device": device_name(device), "torch": torch.__version__}
    known[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, known)
    return {**entry, "cached": False, "key": key}
