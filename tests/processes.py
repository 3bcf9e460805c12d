"""Ports and process groups for the servers and launchers tests start.

A port taken with ``bind(0)`` and released comes from the kernel's ephemeral range, where the next
``bind(0)`` or outgoing connection (torchrun's rendezvous, gloo's pair sockets, an HTTP client) may
get it again before our server binds it: CI saw gradio fail with "Cannot find empty port". Ports
below that range are never handed out automatically, so one found free there stays free unless
someone asks for it by number.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _below_ephemeral() -> range:
    try:
        low = int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA ephemeral range starts at 49152
        low = 49152
    return range(max(1024, low - 12000), max(2048, low))


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now and outside the range the kernel assigns by itself."""
    candidates = _below_ephemeral()
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} in {candidates.start}-{candidates.stop - 1}")


def end_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), SIGKILL it after ``grace`` s.

    The group may already be gone (a launcher that failed, or finished): that is not an error here,
    the test reports how it ended.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
