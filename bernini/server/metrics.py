"""GET /metrics in the Prometheus text format: queue length, jobs by state, seconds per job, GPU memory."""

from __future__ import annotations

import torch

from bernini.server.store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
    """One metric family; each sample is (what follows the name: '', '{label="x"}' or '_sum', value)."""
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{tail} {value:g}" if isinstance(value, float) else f"{name}{tail} {value}" for tail, value in samples]


def render_metrics(store: JobStore, device: torch.device | None, worker_alive: bool) -> str:
    # Five families do not need prometheus_client (not a dependency here); the text format is small and fixed.
    counts = store.counts()
    done, seconds = store.completed_seconds()
    lines: list[str] = []
    _family(lines, "bernini_queue_length", "gauge", "Jobs waiting to render.", [("", counts["queued"])])
    _family(lines, "bernini_jobs", "gauge", "Jobs by state.", [(f'{{state="{s}"}}', n) for s, n in counts.items()])
    _family(lines, "bernini_job_seconds", "summary", "Wall seconds per completed job (planning, render, write, thumbnail).",
            [("_sum", float(seconds)), ("_count", done)])
    _family(lines, "bernini_worker_up", "gauge", "1 while the render worker runs.", [("", int(worker_alive))])
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" alone names no index
        memory = [("allocated", torch.cuda.memory_allocated(index)), ("reserved", torch.cuda.memory_reserved(index)),
                  ("max_allocated", torch.cuda.max_memory_allocated(index))]
        _family(lines, "bernini_gpu_memory_bytes", "gauge", "GPU memory of this process (rank 0's device).",
                [(f'{{kind="{k}",device="cuda:{index}"}}', v) for k, v in memory])
    return "\n".join(lines) + "\n"
