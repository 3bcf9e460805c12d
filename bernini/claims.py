"""Claim files beside outputs (`<output>.claim`): while jobs share a batch, one live job renders each case.

A claim is created with O_CREAT|O_EXCL, so of two jobs racing for a case exactly one gets it; it holds
the owner (host, pid namespace, pid, scheduler job id) and times, is refreshed while the case renders,
and is removed once the case ends. A claim whose owner is gone is stale and is taken over: same host
and a dead pid, the same scheduler job (a re-queued task is its own earlier attempt), or no refresh
for `stale_after` seconds (a job on another host that died). Claim files work on any shared
filesystem that honours O_EXCL (local disks, NFSv3+, Lustre, GPFS). Written here because flock/fcntl
locks (filelock's default) do not reach across hosts everywhere, and filelock's O_EXCL SoftFileLock
records no owner and never takes over a lock whose owner died.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 300.0  # a claim not refreshed for this long belongs to a dead or frozen job
REFRESH_EVERY_S = 30.0
LOCK_WAIT_S = 5.0  # a takeover or refresh lock is held for milliseconds; waiting longer means its taker died
SUFFIX = ".claim"


def claim_path(output: Path) -> Path:
    return output.with_name(output.name + SUFFIX)


def job_id(environ: Mapping[str, str] = os.environ) -> str:
    """The scheduler's name for this task, the same across its re-queued attempts; '' when unknown."""
    if environ.get("BERNINI_JOB_ID"):
        return environ["BERNINI_JOB_ID"]
    if environ.get("SLURM_JOB_ID"):  # an array task has its own SLURM_JOB_ID, kept when it is re-queued
        return f"slurm-{environ['SLURM_JOB_ID']}.{environ.get('SLURM_PROCID', '0')}"  # srun -n N: N tasks of one job
    return ""


def _pid_namespace() -> str:
    # Two containers on one host see the same hostname and may reuse each other's pids.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Owner:
    """Who holds a claim."""

    host: str
    pid: int
    job: str = ""
    pidns: str = ""

    @classmethod
    def current(cls, environ: Mapping[str, str] = os.environ) -> Owner:
        return cls(socket.gethostname(), os.getpid(), job_id(environ), _pid_namespace())

    def same_processes(self, other: Owner) -> bool:
        """Both in one pid space, so a pid of one can be checked by the other."""
        return self.host == other.host and self.pidns == other.pidns

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}" + (f" (job {self.job})" if self.job else "")


@dataclass(frozen=True)
class Claim:
    """What a claim file holds; times are seconds since the epoch on the owner's clock."""

    owner: Owner
    token: str  # tells this claim from an earlier one of the same owner
    claimed: float
    refreshed: float

    def to_bytes(self) -> bytes:
        return (json.dumps({**asdict(self.owner), "token": self.token, "claimed": self.claimed, "refreshed": self.refreshed}) + "\n").encode()

    @classmethod
    def read(cls, path: Path) -> Claim | None:
        """The claim at `path`; None when there is none. Unreadable content (a claim being written, or
        garbage) counts as a claim of an unknown owner, refreshed at the file's mtime."""
        try:
            raw = path.read_bytes()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            owner = Owner(str(data["host"]), int(data["pid"]), str(data.get("job", "")), str(data.get("pidns", "")))
            return cls(owner, str(data["token"]), float(data["claimed"]), float(data["refreshed"]))
        except (ValueError, KeyError, TypeError):
            return cls(Owner("unknown", 0), "", mtime, mtime)

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.refreshed
        return f"{self.owner.describe()}, refreshed {age:.0f} s ago"


def _create(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists: the one atomic step every claim starts with."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """`<claim>.lock` (O_EXCL) around every change to an existing claim: takeover, refresh, release.

    Yields False when the lock could not be had within LOCK_WAIT_S; a lock older than that is left by
    a process that died inside those milliseconds and is broken.
    """
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _create(lock, f"{os.getpid()}\n".encode()):
        try:
            if time.time() - lock.stat().st_mtime > LOCK_WAIT_S * 2:
                log.warning("%s: breaking a lock left for %.0f s", lock, time.time() - lock.stat().st_mtime)
                lock.unlink(missing_ok=True)
                continue
        except FileNotFoundError:
            continue
        if time.monotonic() > deadline:
            yield False
            return
        time.sleep(0.02)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


class Claims:
    """This job's claims on outputs."""

    def __init__(self, owner: Owner | None = None, stale_after: float = STALE_AFTER_S, refresh_every: float = REFRESH_EVERY_S) -> None:
        self.owner = owner or Owner.current()
        self.stale_after = stale_after
        self.refresh_every = refresh_every
        self.held: dict[Path, Claim] = {}

    def is_stale(self, claim: Claim, now: float | None = None) -> bool:
        """The owner is gone: not refreshed in time, an earlier attempt of this job, or a dead pid here."""
        theirs = claim.owner
        if (time.time() if now is None else now) - claim.refreshed > self.stale_after:
            return True
        if theirs.job and theirs.job == self.owner.job and theirs != self.owner:
            return True
        return theirs.same_processes(self.owner) and theirs.pid != self.owner.pid and not pid_alive(theirs.pid)

    def take(self, output: Path) -> Claim | None:
        """Claim `output` for this job. None: it is ours now; else the live claim that holds it."""
        path = claim_path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        mine = Claim(self.owner, uuid.uuid4().hex, now, now)
        for _ in range(3):  # the holder may release between our attempts
            if _create(path, mine.to_bytes()):
                self.held[output] = mine
                return None
            with _locked(path) as locked:
                current = Claim.read(path)
                if current is None:
                    continue  # released meanwhile: race for it again
                if not locked or not self.is_stale(current):
                    return current
                # Takeovers and refreshes happen only under the lock, so nobody changes it between our read and this replace.
                _replace(path, mine.to_bytes())
                log.warning("%s: took over a stale claim of %s", output, current.describe())
                self.held[output] = mine
                return None
        return Claim.read(path) or mine  # released and re-taken three times over: call it held by others

    def refresh(self, output: Path) -> bool:
        """Renew this job's claim; False when it is no longer ours (taken over as stale)."""
        mine = self.held.get(output)
        if mine is None:
            return False
        path = claim_path(output)
        with _locked(path) as locked:
            current = Claim.read(path)
            if current is None or current.token != mine.token:
                log.warning("%s: this job's claim was taken over (now %s)", output, current.describe() if current else "none")
                self.held.pop(output, None)
                return False
            if locked:  # else a taker is deciding: it will find us fresh next time, or we learn we lost
                renewed = Claim(mine.owner, mine.token, mine.claimed, time.time())
                _replace(path, renewed.to_bytes())
                self.held[output] = renewed
        return True

    def release(self, output: Path) -> None:
        """Remove this job's claim (never another's)."""
        mine = self.held.pop(output, None)
        if mine is None:
            return
        path = claim_path(output)
        with _locked(path):
            current = Claim.read(path)
            if current is not None and current.token == mine.token:
                path.unlink(missing_ok=True)

    @contextmanager
    def hold(self, output: Path) -> Iterator[Claim | None]:
        """Yields None while this job holds `output` (refreshed in the background, released at exit),
        else the live claim of the job that holds it."""
        other = self.take(output)
        if other is not None:
            yield other
            return
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.refresh_every):
                try:
                    if not self.refresh(output):
                        return
                except OSError as exc:  # a filesystem hiccup: the next refresh may work
                    log.warning("%s: claim refresh failed: %s", output, exc)

        refresher = threading.Thread(target=renew, name=f"claim:{output.name}", daemon=True)
        refresher.start()
        try:
            yield None
        finally:
            stop.set()
            refresher.join()
            try:
                self.release(output)
            except OSError as exc:  # the case is done either way; a claim left behind goes stale
                log.warning("%s: claim release failed: %s", output, exc)
