"""
Intervals and measurements the benchmarks, the reports and bench.py share: bootstrap intervals of means, the
standard error of a paired difference, the bytes autograd saves for a backward pass, the process's memory.
Knows numbers and tensors only.

    python -m pytest -q tests/test_evaluate.py -k "bootstrap or paired_se or saved"
"""

import resource

import numpy as np
import torch

BOOTSTRAP = 1000  # bootstrap resamples per interval


def bootstrap_ci(groups, seed=0, n=BOOTSTRAP):
    """95% percentile interval of the mean of group means, each group's units (prompts) resampled with
    replacement independently: one group is a plain mean over prompts; geneval's overall is the mean of
    six task groups."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(n)
    for g in groups:
        g = np.asarray(g, dtype=float)
        stats += g[rng.integers(0, len(g), (n, len(g)))].mean(1) / len(groups)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def score(groups):
    """(mean of group means, its interval)."""
    return float(np.mean([np.mean(g) for g in groups])), bootstrap_ci(groups)


def paired_se(diff):
    """Standard error of the mean of diff (sample std, ddof=1, over sqrt(n)): of a paired difference when diff holds
    a - b on the same units (prompts, episodes, seeds), of a plain mean otherwise; nan below two values (no spread)."""
    diff = np.asarray(diff, dtype=float)
    return float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd keeps for the backward pass while the block runs (.bytes): each distinct storage once, at its
    full size (views and a tensor saved twice share one), so the activation memory a step needs, counted exactly
    whatever else the machine does (a CPU build of torch reports no allocator peak)."""

    def __init__(self):
        self.storages = {}
        super().__init__(self._pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, t):
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self):
        return sum(self.storages.values())


def rss_mb(field):
    """MB of this process's resident memory: VmRSS (now) or VmHWM (the peak) from /proc/self/status; off Linux
    the peak getrusage reports."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB (macOS bytes)
