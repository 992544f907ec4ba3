"""One writer per dataset root: a lease object ``_lease.json`` held by the running driver.

The lease names its driver (id, host, pid, start time, spec hash) and an expiry. It is taken
with a create-if-absent (S3 ``If-None-Match: *``, local exclusive create), renewed by a
background thread while the driver runs, and deleted at the end. A lease past its expiry
(a crashed driver), or one whose driver is a dead process on this host, may be taken over:
the taker first wins a create-if-absent on a marker named after the exact bytes it replaces,
so of two drivers taking over the same lease only one succeeds. A driver never renews a
lease that has already expired: it stops instead (its lease may be someone else's now).

Expiry times are wall-clock seconds of the writer; hosts sharing a root need clocks agreeing
to well within the TTL (NTP does that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sia_pipeline.io.storage import Storage, StorageError

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
PUBLISHER = "sia-publish"  # the spec_hash sia-publish's lease carries (it writes no shards)
DEFAULT_TTL = 120.0
MIN_TTL = 1.0
_ACQUIRE_TRIES = 8


class LeaseHeld(RuntimeError):
    """Another driver holds the root's lease (bad input for this run: CLI exit 2)."""

    def __init__(self, message: str, holder: LeaseInfo) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This driver's lease expired or was taken over while it ran (CLI exit 1)."""


@dataclass(frozen=True)
class LeaseInfo:
    """The contents of ``_lease.json``."""

    driver: str
    host: str
    pid: int
    spec_hash: str
    started: float
    expires: float
    ttl: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseInfo | None:
        """The lease in ``data``, or None if it is not a lease document."""
        try:
            d = json.loads(data)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (json.JSONDecodeError, TypeError, KeyError):
            return None

    def holder(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host} pid {self.pid}, started {started}"

    def dead_here(self) -> bool:
        """Whether the holder is a process of this host that no longer exists."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _held_message(url: str, holder: LeaseInfo, spec_hash: str, now: float) -> str:
    if holder.spec_hash == PUBLISHER:
        return held_elsewhere(url, holder, now)
    left = max(0, round(holder.expires - now))
    if holder.spec_hash != spec_hash:
        return (
            f"{url} is being written by another sia-gen with a different spec"
            f" ({holder.spec_hash}; this run is {spec_hash}): {holder.holder()};"
            f" its lease expires in {left} s unless renewed"
        )
    return (
        f"{url} is already being written by another sia-gen of this spec"
        f" ({holder.holder()}): one writer per root; rerun when it ends"
        f" (if it died, its lease expires in {left} s)"
    )


class Lease:
    """The lease of one driver on one root; use as a context manager around the run.

    Args:
        storage: the dataset root.
        spec_hash: the spec this driver writes (named in the refusal of other drivers).
        ttl: seconds the lease lasts without renewal; renewed every ``ttl / 3``.
    """

    def __init__(self, storage: Storage, spec_hash: str, ttl: float = DEFAULT_TTL) -> None:
        self.storage = storage
        self.spec_hash = spec_hash
        self.ttl = float(ttl)
        self.driver = uuid.uuid4().hex
        self.started = time.time()
        self._held: bytes | None = None  # the bytes of our lease as last written
        self._expires = 0.0
        self._lost: str = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- taking the lease ----------------------------------------------------------------

    def _doc(self, now: float) -> bytes:
        info = LeaseInfo(
            driver=self.driver,
            host=socket.gethostname(),
            pid=os.getpid(),
            spec_hash=self.spec_hash,
            started=self.started,
            expires=now + self.ttl,
            ttl=self.ttl,
        )
        return info.to_bytes()

    def _read(self, name: str = LEASE_NAME) -> bytes | None:
        try:
            return self.storage.get_bytes(name)
        except FileNotFoundError:
            return None

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`LeaseHeld` naming the driver that holds it."""
        for _ in range(_ACQUIRE_TRIES):
            now = time.time()
            doc = self._doc(now)
            if self.storage.put_if_absent(LEASE_NAME, doc):
                return self._taken(doc, now)
            current = self._read()
            if current is None:
                continue  # released meanwhile
            info = LeaseInfo.from_bytes(current)
            if info is not None and info.expires > now and not info.dead_here():
                raise LeaseHeld(_held_message(self.storage.url, info, self.spec_hash, now), info)
            why = "unreadable" if info is None else f"of {info.holder()}, expired"
            if self._take_over(current, doc):
                log.warning("took over the lease on %s (%s)", self.storage.url, why)
                return self._taken(doc, now)
        msg = f"could not take the lease on {self.storage.url}: it kept changing hands"
        raise LeaseLost(msg)

    def _take_over(self, current: bytes, doc: bytes) -> bool:
        """Replace the lease ``current`` by ``doc``; False if it changed meanwhile."""
        marker = f"{LEASE_NAME}.takeover-{hashlib.sha256(current).hexdigest()[:16]}"
        if not self.storage.put_if_absent(marker, doc):
            other = self._read(marker)
            info = LeaseInfo.from_bytes(other) if other else None
            now = time.time()
            if info is not None and info.expires > now and not info.dead_here():
                raise LeaseHeld(_held_message(self.storage.url, info, self.spec_hash, now), info)
            self.storage.delete(marker)  # its writer died mid-takeover
            return False
        try:
            if self._read() != current:
                return False  # renewed or released since we looked
            self.storage.put_bytes(doc, LEASE_NAME)
            return True
        finally:
            self.storage.delete(marker)

    def _taken(self, doc: bytes, now: float) -> Lease:
        self._held, self._expires = doc, now + self.ttl
        self._thread = threading.Thread(target=self._renew_loop, name="sia-lease", daemon=True)
        self._thread.start()
        log.info("took the lease on %s (ttl %g s)", self.storage.url, self.ttl)
        return self

    # -- holding it ------------------------------------------------------------------------

    def renew(self) -> None:
        """Extend the lease by ``ttl`` from now; :class:`LeaseLost` if it is no longer ours."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            now = time.time()
            if now >= self._expires:
                self._lose(f"the lease on {self.storage.url} expired before it was renewed")
            current = self._read()
            if current != self._held:
                info = LeaseInfo.from_bytes(current) if current else None
                who = f"taken over by {info.holder()}" if info else "removed"
                self._lose(f"the lease on {self.storage.url} was {who}")
            doc = self._doc(now)
            self.storage.put_bytes(doc, LEASE_NAME)
            self._held, self._expires = doc, now + self.ttl

    def _lose(self, why: str) -> None:
        self._lost = f"{why}; stopped so as not to write beside another driver"
        raise LeaseLost(self._lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except (StorageError, OSError) as e:  # transient: the next tick retries
                log.warning("could not renew the lease on %s: %s", self.storage.url, e)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was lost (call between units of work)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if self._held is not None and time.time() >= self._expires:
            with self._lock:
                if not self._lost:
                    self._lost = f"the lease on {self.storage.url} expired before it was renewed"
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self._held is None:
                return
            try:
                if self._read() == self._held:
                    self.storage.delete(LEASE_NAME)
            except (StorageError, OSError) as e:
                log.warning("could not release the lease on %s: %s", self.storage.url, e)
            self._held = None

    @property
    def info(self) -> LeaseInfo | None:
        return LeaseInfo.from_bytes(self._held) if self._held else None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held_elsewhere(url: str, holder: LeaseInfo, now: float | None = None) -> str:
    """One line naming who holds ``url`` (sia-publish, or a sia-gen of any spec) and until
    when; sia-gen's own refusals say more about specs (:func:`_held_message`)."""
    what = "published by sia-publish" if holder.spec_hash == PUBLISHER else "written by sia-gen"
    left = max(0, round(holder.expires - (time.time() if now is None else now)))
    return (
        f"{url} is being {what} ({holder.holder()}); rerun when it ends"
        f" (if it died, its lease expires in {left} s)"
    )


def active_lease(storage: Storage) -> LeaseInfo | None:
    """The root's lease if a live driver holds it (read only: nothing is written)."""
    try:
        info = LeaseInfo.from_bytes(storage.get_bytes(LEASE_NAME))
    except FileNotFoundError:
        return None
    if info is None or info.expires <= time.time() or info.dead_here():
        return None
    return info


class LeaseSlot:
    """Where a run keeps its lease: refuse early (read only), take it just before the first
    write, check it between shards, release it at the end whatever happens."""

    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        if not ttl >= MIN_TTL:
            msg = f"--lease-ttl must be >= {MIN_TTL:g} s, got {ttl}"
            raise ValueError(msg)
        self.ttl = float(ttl)
        self.lease: Lease | None = None

    def refuse_if_held(self, storage: Storage, spec_hash: str) -> None:
        """Raise :class:`LeaseHeld` if a live driver holds the root (writes nothing)."""
        info = active_lease(storage)
        if info is not None:
            raise LeaseHeld(_held_message(storage.url, info, spec_hash, time.time()), info)

    def take(self, storage: Storage, spec_hash: str) -> Lease:
        self.lease = Lease(storage, spec_hash, self.ttl).acquire()
        return self.lease

    def check(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def checked(self, callback: Any) -> Any:
        """``callback`` (or nothing) preceded by a lease check, for the runner's on_result."""

        def on_result(*args: Any) -> None:
            self.check()
            if callback is not None:
                callback(*args)

        return on_result

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
