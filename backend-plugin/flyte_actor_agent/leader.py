"""Leader election through a Kubernetes Lease (``coordination.k8s.io/v1``), for two or more agent pods.

One pod leads: it serves the connector and the lease service and owns the replicas; the others wait, not Ready,
so the Service sends propeller and the replicas to the leader only. The protocol is client-go's
(``tools/leaderelection``), written out because the Python client has none to rely on:

- every ``retry_period`` each pod reads the Lease; the holder renews it (``renewTime``), a pod that sees no
  holder, or a record that has not changed for ``lease_duration`` *on its own clock* (so clocks need not
  agree), takes it; every write carries the ``resourceVersion`` it read, so of two pods only one wins;
- a leader that has not renewed for ``renew_deadline`` (< ``lease_duration``) stops acting at once (it is
  fenced: the caller's ``on_lost`` ends the process) before anyone else can take the Lease;
- a leader that shuts down releases the Lease (empty holder), so a standby takes it at its next try.

A killed leader is replaced within ``lease_duration + retry_period`` (12 s with the defaults), a released one
within ``retry_period``. :class:`LeaderElector` is a state machine over a :class:`LeaseStore` and a clock, so
its unit tests need neither a cluster nor time; :class:`KubernetesLeaseStore` is the store over the API server.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Protocol

log = logging.getLogger("flyte-actor-agent")

LEASE_DURATION_SECONDS = 10.0
RENEW_DEADLINE_SECONDS = 7.0
RETRY_PERIOD_SECONDS = 2.0


class Conflict(Exception):
    """Someone else wrote the Lease since we read it (HTTP 409), or created it first."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    lease_duration_seconds: int
    #: Wall-clock times as the API server stores them; only compared for change, never against our clock.
    acquire_time: Optional[datetime.datetime]
    renew_time: Optional[datetime.datetime]
    transitions: int = 0
    resource_version: str = ""


class LeaseStore(Protocol):
    def get(self) -> Optional[LeaseRecord]:
        """The Lease, or None if it does not exist."""

    def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create it; :class:`Conflict` if it exists."""

    def update(self, record: LeaseRecord) -> LeaseRecord:
        """Replace it if its resourceVersion is still ``record.resource_version``; else :class:`Conflict`."""


class LeaderElector:
    """Call :meth:`step` every ``retry_period`` (:meth:`run` does). ``on_elected`` runs once when this pod
    becomes leader, ``on_lost`` once when it stops being one without releasing."""

    def __init__(self, store: LeaseStore, identity: str, on_elected: Callable[[], None],
                 on_lost: Callable[[], None], clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
                 lease_duration: float = LEASE_DURATION_SECONDS, renew_deadline: float = RENEW_DEADLINE_SECONDS,
                 retry_period: float = RETRY_PERIOD_SECONDS):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError(
                f"leader election needs retry_period < renew_deadline < lease_duration, got {retry_period:g}, "
                f"{renew_deadline:g}, {lease_duration:g}: a leader must give up before another pod may take over")
        self.store = store
        self.identity = identity
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.clock = clock
        self.wall_clock = wall_clock
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leading = False
        self.renewed_at = float("-inf")
        self._observed: Optional[LeaseRecord] = None
        self._observed_at = float("-inf")
        self._stop = threading.Event()

    def step(self) -> bool:
        """One try to take or renew the Lease; returns whether this pod leads now."""
        now = self.clock()
        try:
            held = self._try_acquire_or_renew(now)
        except Conflict:
            held = False
        except Exception as e:  # noqa: BLE001 - an unreachable API server is a failed try, nothing more
            log.warning("leader election: the Lease could not be read or written: %s", e)
            held = False
        if held:
            self.renewed_at = now
            if not self.leading:
                self.leading = True
                log.info("leader election: %s leads", self.identity)
                self.on_elected()
        elif self.leading and now - self.renewed_at >= self.renew_deadline:
            self.leading = False
            log.error("leader election: %s could not renew the Lease for %.1fs; it stops acting now",
                      self.identity, now - self.renewed_at)
            self.on_lost()
        return self.leading

    def _try_acquire_or_renew(self, now: float) -> bool:
        wall = self.wall_clock()
        record = self.store.get()
        if record is None:
            self._observe(self.store.create(LeaseRecord(
                self.identity, int(self.lease_duration), wall, wall, 0)), now)
            return True
        self._observe(record, now)
        mine = record.holder == self.identity
        if record.holder and not mine and now < self._observed_at + self.lease_duration:
            return False  # someone else holds a live lease
        taken = replace(
            record, holder=self.identity, lease_duration_seconds=int(self.lease_duration), renew_time=wall,
            acquire_time=record.acquire_time if mine else wall,
            transitions=record.transitions if mine else record.transitions + 1)
        self._observe(self.store.update(taken), now)
        return True

    def _observe(self, record: LeaseRecord, now: float) -> None:
        """Remember when, on our clock, the record last changed: a holder is live for ``lease_duration`` after
        that, whatever its own clock says."""
        if self._observed is None or (record.holder, record.renew_time, record.resource_version) != (
                self._observed.holder, self._observed.renew_time, self._observed.resource_version):
            self._observed = record
            self._observed_at = now

    def release(self) -> None:
        """Give the Lease up (at shutdown, after this pod stopped acting), so a standby takes it at once."""
        self._stop.set()
        if not self.leading:
            return
        self.leading = False
        try:
            record = self.store.get()
            if record is not None and record.holder == self.identity:
                self.store.update(replace(record, holder="", lease_duration_seconds=1))
                log.info("leader election: %s released the Lease", self.identity)
        except Exception as e:  # noqa: BLE001 - then the Lease simply expires
            log.warning("leader election: could not release the Lease (it expires in %gs): %s",
                        self.lease_duration, e)

    def run(self) -> None:
        """Try every ``retry_period`` until :meth:`release`; blocking (run it in a thread)."""
        while not self._stop.is_set():
            started = self.clock()
            self.step()
            self._stop.wait(max(0.0, self.retry_period - (self.clock() - started)))


class KubernetesLeaseStore:
    """A Lease object through the API server: reads, creates, and replaces guarded by resourceVersion."""

    def __init__(self, name: str, namespace: str, api=None):
        from kubernetes import client

        self.name = name
        self.namespace = namespace
        self._client = client
        self.api = api or client.CoordinationV1Api()

    def get(self) -> Optional[LeaseRecord]:
        from kubernetes.client.rest import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=RETRY_PERIOD_SECONDS)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return self._record(lease)

    def create(self, record: LeaseRecord) -> LeaseRecord:
        from kubernetes.client.rest import ApiException

        try:
            return self._record(self.api.create_namespaced_lease(
                self.namespace, self._body(record), _request_timeout=RETRY_PERIOD_SECONDS))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(str(e.reason)) from None
            raise

    def update(self, record: LeaseRecord) -> LeaseRecord:
        from kubernetes.client.rest import ApiException

        try:
            return self._record(self.api.replace_namespaced_lease(
                self.name, self.namespace, self._body(record), _request_timeout=RETRY_PERIOD_SECONDS))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(str(e.reason)) from None
            raise

    def _body(self, record: LeaseRecord):
        c = self._client
        return c.V1Lease(
            metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace,
                                    resource_version=record.resource_version or None),
            spec=c.V1LeaseSpec(holder_identity=record.holder, lease_duration_seconds=record.lease_duration_seconds,
                               acquire_time=record.acquire_time, renew_time=record.renew_time,
                               lease_transitions=record.transitions))

    @staticmethod
    def _record(lease) -> LeaseRecord:
        spec = lease.spec
        return LeaseRecord(
            holder=spec.holder_identity or "", lease_duration_seconds=spec.lease_duration_seconds or 0,
            acquire_time=spec.acquire_time, renew_time=spec.renew_time, transitions=spec.lease_transitions or 0,
            resource_version=lease.metadata.resource_version or "")


#: The label on agent pods that says which one leads; the chart's Service selects ``leader``.
ROLE_LABEL = "flyte-actors.io/agent-role"


class PodRole:
    """Labels this agent pod ``leader`` or ``standby``, so that a Service selecting the leader routes propeller
    and the replicas to it, while every pod stays Ready (a standby that is not Ready would stall a Deployment's
    rolling update, which waits for new pods to be Ready before it stops old ones)."""

    def __init__(self, pod: str, namespace: str, api=None):
        from kubernetes import client

        self.pod = pod
        self.namespace = namespace
        self.api = api or client.CoreV1Api()

    def mark(self, role: str, tries: int = 5, pause: float = 1.0) -> None:
        for attempt in range(1, tries + 1):
            try:
                self.api.patch_namespaced_pod(self.pod, self.namespace, {"metadata": {"labels": {ROLE_LABEL: role}}},
                                              _request_timeout=RETRY_PERIOD_SECONDS)
                return
            except Exception as e:  # noqa: BLE001 - retried, then the caller decides
                if attempt == tries:
                    raise RuntimeError(f"could not label pod {self.namespace}/{self.pod} {ROLE_LABEL}={role}: {e}") \
                        from None
                time.sleep(pause)


__all__ = ["Conflict", "KubernetesLeaseStore", "LeaderElector", "LeaseRecord", "LeaseStore", "PodRole", "ROLE_LABEL"]
