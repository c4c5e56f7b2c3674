"""The scheduling core: queues, fleets, leases and actor maps, with no I/O and no clock of its own.

Every method takes an event (a task submitted, a replica connected, a status reported, time passing) and returns
the effects the caller must carry out (launch or stop a replica, send an assignment, a cancel or an ack, wake
whoever waits on a task). The agent's reactor is the only caller in production; tests drive it directly:

    >>> s = Scheduler(clock=lambda: 0.0, new_id=iter(["r1", "l1"]).__next__, new_token=lambda: "t")
    >>> env = FleetConfig(key="hello-abc", name="hello", replica_count=1, ttl_seconds=60, parallelism=1)
    >>> [type(e).__name__ for e in s.submit(TaskRequest(key="t1", fleet=env, payload="task"))]
    ['Launch']
    >>> (assign,) = s.replica_connected("r1", "t", "hello-abc", capacity=1)
    >>> type(assign).__name__, assign.lease_id.split("|")[1]
    ('Assign', 't1')
    >>> [type(e).__name__ for e in s.report("r1", assign.lease_id, Outcome.SUCCEEDED, outputs=b"")]
    ['Ack', 'Finished']
"""

from __future__ import annotations

import enum
import math
import secrets
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Set, Union

from .lease_ids import LeaseIds

if TYPE_CHECKING:
    from flytekitplugins.actor.contract import SerializedEnvironment

    from .placement import Placement

#: A replica that says nothing (no heartbeat, no status) for this long is treated as lost.
HEARTBEAT_TIMEOUT_SECONDS = 30.0
#: After replicas of a fleet failed to start, tasks for it fail at once for this long, then a launch is retried.
START_RETRY_AFTER_SECONDS = 60.0


def element_key(map_key: str, index: int) -> str:
    """The key of an actor map's element: recovery finds a map's elements by it (``<map key>/<index>``)."""
    return f"{map_key}/{index}"


def _element_of(key: str) -> tuple:
    """``(map key, index)`` of an element key; ``("", -1)`` for other keys."""
    parent, _, index = key.rpartition("/")
    return (parent, int(index)) if parent and index.isdigit() else ("", -1)


#: How long a finished task's result is kept for GetTask (propeller stops asking once it saw a terminal phase).
RETAIN_SECONDS = 3600.0
#: A replica that has not connected this long after its launch is stopped and counts as a failed start.
START_TIMEOUT_SECONDS = 600.0
#: Extra time the agent gives a replica past a task's own timeout before taking the lease back.
LEASE_GRACE_SECONDS = 30.0
#: An actor map keeps at most this many bytes of element outputs in memory; the rest are read back from the
#: elements' output prefixes when the map's outputs are assembled.
MAP_INLINE_BUDGET_BYTES = 32 * 1024 * 1024
#: An actor map has at most this many elements queued or running per replica slot of its fleet (whatever its
#: ``concurrency``), so a map of 100,000 elements holds a window of them in memory, not all.
MAP_WINDOW_PER_SLOT = 8
#: ... and a map whose elements take less than VERY_QUICK_SECONDS (lease to result, a moving average) this many:
#: elements of a few milliseconds then go to an executor in batches of tens rather than a few, and every message
#: between executor, replica and agent carries more of them (the warm 2,000-element map on 25 replicas of
#: benchmark 8 took 2.4 s with 32 against 3.3 s with 8, same fleet, runs interleaved). A long element holds at
#: most 31 queued behind it for under 8 s (31 x 0.25 s). Only for elements whose payload (the serialized TaskRun,
#: inputs inline) is at most QUICK_WINDOW_ELEMENT_BYTES: the window is what the agent holds in memory per map.
QUICK_MAP_WINDOW_PER_SLOT = 32
VERY_QUICK_SECONDS = 0.25
QUICK_WINDOW_ELEMENT_BYTES = 64 * 1024
#: Elements of a quick map (see PREFETCH_BELOW_SECONDS) leased to a replica beyond its free slots, per slot, when
#: the replica queues leases (Hello.queue_depth): the replica starts the next as soon as a slot frees, and runs
#: the queued elements of one map in one executor session (a batch), instead of waiting a round trip per element.
#: How many a map has queued is bounded by its window (above).
PREFETCH_PER_SLOT = QUICK_MAP_WINDOW_PER_SLOT - 1
#: A map's elements are prefetched only while they finish in less than this on average: behind a long element,
#: a queued one would wait while another replica idles.
PREFETCH_BELOW_SECONDS = 1.0
#: Tasks that are not map elements are leased beyond free slots too, at most this many per slot, while their task
#: (its name, in its fleet) finished in less than VERY_QUICK_SECONDS on average lately (lease to result, a moving
#: average that counts the wait behind the queued ones, so a queue of slower tasks shortens itself): each still
#: runs alone in a sandbox session of its own, but a stream of millisecond tasks then costs a message and a
#: wake-up per batch instead of per task (benchmark 3). Unknown tasks, and slower ones, wait for a free slot.
TASK_PREFETCH_PER_SLOT = 7
#: How many task names a fleet remembers the duration of (the least recently finished is forgotten first).
TASK_SECONDS_KEPT = 256
#: A task given back unstarted (see Outcome.CANCELLED) this many times counts as lost from then on.
GIVE_BACK_LIMIT = 20
#: A replica that holds leases queued beyond its slots and has reported no result for this long is busy with
#: something long (a task that usually takes milliseconds and now takes minutes): the agent recalls its queued
#: leases (``Recall``: the replica gives back those it has not handed to an executor, to run elsewhere) and queues
#: nothing more on it until it reports a result. Twice the longest a queued task or element may take on average
#: (PREFETCH_BELOW_SECONDS), so a replica working through a quick queue is never recalled.
RECALL_AFTER_SECONDS = 2 * PREFETCH_BELOW_SECONDS
#: An actor map keeps the messages of its first this many failed elements (for its message and progress page).
MAP_ERRORS_KEPT = 100
#: How an element's outputs are held when they are not in memory: in ``<map output prefix>/<index>/outputs.pb``
#: (or where the connector found them, for elements recovered from an earlier attempt or after a restart). An
#: element whose outputs are in an element group file holds that file's URI instead.
IN_PREFIX = "in-prefix"
#: How long a replica whose lease stream dropped keeps its leases, waiting for it to reconnect (a TCP reset, an
#: agent-side network blip), before it is stopped and its tasks are leased again.
RECONNECT_GRACE_SECONDS = 10.0
#: A lease that a replica's heartbeats have not listed for this long (two heartbeats at least) never reached it.
GHOST_GRACE_SECONDS = 5.0
#: Starts ended by a signal or a deleted pod (someone else's doing) that are retried before they count as failed
#: starts; the bound keeps a replica the OS kills on every start (out of memory at import) from looping forever.
KILLED_START_LIMIT = 5


class Outcome(enum.Enum):
    """How a lease ended, as a replica reports it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"  # the executor died: lease again
    CANCELLED = "cancelled"


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # not worth retrying (user error)
    RETRYABLE_FAILED = "retryable_failed"  # worth retrying (system error, timeout, replicas lost)
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self not in (Phase.QUEUED, Phase.RUNNING)


# ----------------------------------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class Launch:
    replica_id: str
    token: str
    fleet: FleetConfig


@dataclass(frozen=True)
class Stop:
    replica_id: str
    reason: str


@dataclass(frozen=True)
class Assign:
    replica_id: str
    lease_id: str
    task: "TaskState"


@dataclass(frozen=True)
class CancelLease:
    replica_id: str
    lease_id: str
    reason: str


@dataclass(frozen=True)
class Recall:
    replica_id: str
    reason: str


@dataclass(frozen=True)
class Ack:
    replica_id: str
    lease_id: str


@dataclass(frozen=True)
class Disconnect:
    """Close the replica's lease stream (it lost messages); the replica reconnects within the reconnect grace."""

    replica_id: str
    reason: str


@dataclass(frozen=True)
class Finished:
    """A task (or actor map) reached a terminal phase: wake whoever waits on ``key``."""

    key: str


Effect = Union[Launch, Stop, Assign, CancelLease, Recall, Ack, Disconnect, Finished]


class ReplicaRefused(Exception):
    """A replica that tried to connect is not one we launched, not with that token, or is being stopped."""


class ExitReason(enum.Enum):
    """Why a replica is gone, as a bounded value (metrics label it; people read ``ReplicaExit.detail``)."""

    IMAGE_PULL = "image_pull"
    CRASH_LOOP = "crash_loop"
    CONFIG_ERROR = "config_error"
    OOM_KILLED = "oom_killed"
    UNSCHEDULABLE = "unschedulable"
    DELETED = "deleted"
    NO_HEARTBEAT = "no_heartbeat"
    STREAM_CLOSED = "stream_closed"
    START_TIMEOUT = "start_timeout"
    LAUNCH_FAILED = "launch_failed"
    REFUSED = "refused"  # the agent's own policy forbids the replica: another try cannot help
    STOPPED = "stopped"
    KILLED = "killed"
    EXITED = "exited"


@dataclass(frozen=True)
class ReplicaExit:
    reason: ExitReason
    #: What a person can act on (a pod's reason and message, a process's last output).
    detail: str

    def __str__(self) -> str:
        return self.detail

# ------------------------------------------------------------------------------------------------------- state


@dataclass
class TaskRequest:
    key: str
    fleet: FleetConfig
    payload: Any  # what the replica needs to run the task; opaque here
    timeout_seconds: float = 0.0
    name: str = ""


@dataclass(eq=False)
class TaskState:
    key: str
    fleet_key: str
    payload: Any
    timeout_seconds: float
    name: str
    submitted_at: float
    phase: Phase = Phase.QUEUED
    message: str = ""
    outputs: Union[bytes, str, None] = None  # IN_PREFIX: only in the output prefix
    error: Optional[bytes] = None
    leases: int = 0  # how many times it was leased
    system_failures: int = 0  # leases lost or failed by the system (replica lost, RECOVERABLE system error)
    user_failures: int = 0  # retryable user failures (RECOVERABLE user error, timeout) of a map element
    given_back: int = 0  # leases a replica returned unstarted (CANCELLED): queued when it stopped, or it was full
    #: The replica of the last failed try of a map element, avoided for the next when another one is free.
    avoid_replica: Optional[str] = None
    lease_id: Optional[str] = None
    replica_id: Optional[str] = None
    started_at: Optional[float] = None
    #: When its current (or last) lease was given.
    leased_at: Optional[float] = None
    finished_at: Optional[float] = None
    deadline: Optional[float] = None
    parent: Optional["MapJob"] = None
    index: int = 0


class ReplicaState(enum.Enum):
    STARTING = "starting"  # launched, not connected yet
    READY = "ready"
    DISCONNECTED = "disconnected"  # its stream dropped: it keeps its leases for the reconnect grace
    STOPPING = "stopping"  # asked to stop (idle, drained or lost)


@dataclass(eq=False)
class Replica:
    id: str
    token: str
    fleet_key: str
    launched_at: float
    state: ReplicaState = ReplicaState.STARTING
    capacity: int = 1
    leases: Set[str] = field(default_factory=set)
    idle_since: float = 0.0
    last_seen: float = 0.0
    tasks_run: int = 0
    adopted: bool = False
    #: When it first connected (None while starting).
    connected_at: Optional[float] = None
    #: Why a starting replica waits for resources (its pod has no node yet, its namespace is over quota); while
    #: it waits, the start timeout does not run: waiting is not failing.
    waiting: str = ""
    #: The last task that failed or was lost on it, for the status page.
    last_failure: str = ""
    #: When its stream dropped (while DISCONNECTED).
    disconnected_at: float = 0.0
    #: Leases it holds that its heartbeats have not listed, and since when.
    unreported: Dict[str, float] = field(default_factory=dict)
    #: Leases it queues beyond ``capacity`` (its Hello's queue_depth; 0 for replicas that predate queueing).
    queue_depth: int = 0
    #: Its queue is being topped up (see _queue_slot).
    refilling: bool = False
    #: When it last reported a result (a give-back is none), or got a lease while it held none.
    progress_at: float = 0.0
    #: Its queued leases were recalled (RECALL_AFTER_SECONDS): nothing more is queued on it until it reports.
    recalled: bool = False


@dataclass(frozen=True)
class FleetConfig:
    """What the core needs to know of a fleet. Built by :func:`flyte_actor_agent.placement.fleet_config` (the
    connector and restart adoption share it); the core reads no field below ``lineage``."""

    key: str
    name: str
    replica_count: int
    ttl_seconds: float
    parallelism: int
    #: Fleets of one lineage are versions of one environment in one place; the newest one replaces the others.
    lineage: str = ""
    #: The environment as its tasks carry it, and where its replicas run: what a launcher needs.
    environment: Optional["SerializedEnvironment"] = field(default=None, compare=False, hash=False)
    placement: Optional["Placement"] = field(default=None, compare=False, hash=False)


@dataclass(eq=False)
class Fleet:
    config: FleetConfig
    #: A newer version of the environment is in use: this fleet's replicas stop as soon as they are idle.
    superseded: bool = False
    queue: Deque[TaskState] = field(default_factory=deque)
    replicas: Dict[str, Replica] = field(default_factory=dict)
    start_failures: int = 0
    killed_starts: int = 0
    last_start_error: str = ""
    failed_at: float = float("-inf")
    #: The last replica that went away without being asked to, and when (for the status page).
    last_replica_failure: Optional[ReplicaExit] = None
    last_replica_failure_at: float = 0.0
    #: Seconds from lease to result of recent tasks that are not map elements, per task name (moving averages).
    task_seconds: Dict[str, float] = field(default_factory=dict)

    def task_finished(self, name: str, seconds: float) -> None:
        last = self.task_seconds.pop(name, None)
        if last is None and len(self.task_seconds) >= TASK_SECONDS_KEPT:
            del self.task_seconds[next(iter(self.task_seconds))]
        self.task_seconds[name] = _moving_average(last, seconds)

    def very_quick(self, name: str) -> bool:
        return self.task_seconds.get(name, VERY_QUICK_SECONDS) < VERY_QUICK_SECONDS


def _moving_average(last: Optional[float], seconds: float) -> float:
    """How long recent runs took (lease to result): the last average moved a fifth of the way to ``seconds``."""
    return seconds if last is None else 0.8 * last + 0.2 * seconds


@dataclass(eq=False)
class MapJob:
    key: str
    fleet: FleetConfig
    size: int
    make_element: Callable[[int], TaskRequest]
    concurrency: int  # 0: no limit but the fleet's (MAP_WINDOW_PER_SLOT)
    min_success_ratio: float
    submitted_at: float
    #: Retries of each element after a retryable user failure (the task's ``retries``); system failures have
    #: their own budget (``max_leases``), as in Flyte.
    retries: int = 0
    min_successes: Optional[int] = None
    #: Elements whose outputs an earlier attempt of the map already wrote; they are not run again.
    recovered: Set[int] = field(default_factory=set)
    phase: Phase = Phase.RUNNING
    message: str = ""
    next_index: int = 0
    in_flight: Dict[int, TaskState] = field(default_factory=dict)
    #: Per element: its outputs (bytes), IN_PREFIX, the URI of the element group file holding them, or None
    #: (failed, or not finished yet).
    outputs: List[Union[bytes, str, None]] = field(default_factory=list)
    inline_bytes: int = 0
    errors: Dict[int, str] = field(default_factory=dict)
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    finished_at: Optional[float] = None
    #: Elements a resumed map does not start: their outputs were stored, or an adopted replica still runs them.
    resumed: Set[int] = field(default_factory=set)
    #: Seconds from lease to result of its recent elements (a moving average; None until one finished).
    element_seconds: Optional[float] = None
    #: The largest payload of its elements made so far, in bytes.
    largest_element_bytes: int = 0

    @property
    def quick(self) -> bool:
        """Whether its elements may be leased beyond free slots (see PREFETCH_BELOW_SECONDS)."""
        return self.element_seconds is not None and self.element_seconds < PREFETCH_BELOW_SECONDS

    @property
    def very_quick(self) -> bool:
        """Whether it gets the larger window (see QUICK_MAP_WINDOW_PER_SLOT)."""
        return (self.element_seconds is not None and self.element_seconds < VERY_QUICK_SECONDS
                and self.largest_element_bytes <= QUICK_WINDOW_ELEMENT_BYTES)

    @property
    def required(self) -> int:
        """Elements that must succeed: ``min_successes`` if set, else ``min_success_ratio`` of them (as Flyte's
        ArrayNode)."""
        if self.min_successes is not None:
            return self.min_successes
        return math.ceil(self.min_success_ratio * self.size - 1e-9)

    @property
    def allowed_failures(self) -> int:
        return self.size - self.required

    @property
    def tolerance(self) -> str:
        if self.min_successes is not None:
            return f"min_successes={self.min_successes}"
        return f"min_success_ratio={self.min_success_ratio:g}"


# --------------------------------------------------------------------------------------------------- scheduler


class Scheduler:
    def __init__(
        self,
        clock: Callable[[], float],
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12],
        new_token: Callable[[], str] = lambda: secrets.token_urlsafe(24),
        max_leases: int = 3,
        start_failure_limit: int = 2,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS,
        lease_grace: float = LEASE_GRACE_SECONDS,
        start_retry_after: float = START_RETRY_AFTER_SECONDS,
        retain: float = RETAIN_SECONDS,
        start_timeout: float = START_TIMEOUT_SECONDS,
        lease_key: Optional[bytes] = None,
        max_output_bytes: int = 0,
        map_inline_budget: int = MAP_INLINE_BUDGET_BYTES,
        reconnect_grace: float = RECONNECT_GRACE_SECONDS,
        ghost_grace: float = GHOST_GRACE_SECONDS,
        killed_start_limit: int = KILLED_START_LIMIT,
    ):
        """``lease_key`` signs lease ids (see :mod:`.lease_ids`); without one, a random key of this scheduler."""
        self.clock = clock
        self.lease_ids = LeaseIds(lease_key or secrets.token_bytes(32))
        self.new_id = new_id
        self.new_token = new_token
        self.max_leases = max_leases
        self.start_failure_limit = start_failure_limit
        self.heartbeat_timeout = heartbeat_timeout
        self.lease_grace = lease_grace
        self.start_retry_after = start_retry_after
        self.retain = retain
        self.start_timeout = start_timeout
        #: Outputs larger than this fail their task (0: no cap); the server's --max-output-bytes.
        self.max_output_bytes = max_output_bytes
        self.map_inline_budget = map_inline_budget
        self.reconnect_grace = reconnect_grace
        self.ghost_grace = ghost_grace
        self.killed_start_limit = killed_start_limit
        self._finished: Deque[tuple] = deque()  # (finished_at, key), oldest first, to forget results in O(1)
        self.fleets: Dict[str, Fleet] = {}
        self.tasks: Dict[str, TaskState] = {}
        self.maps: Dict[str, MapJob] = {}
        self.replicas: Dict[str, Replica] = {}
        self.leases: Dict[str, TaskState] = {}
        self.draining = False

    # ------------------------------------------------------------------------------------------ submissions

    def submit(self, request: TaskRequest) -> List[Effect]:
        """Queue a task; a second submit with the same key is a no-op (CreateTask may be retried)."""
        if request.key in self.tasks or request.key in self.maps:
            return []
        effects: List[Effect] = []
        self._use_fleet(request.fleet, effects)
        task = self._new_task(request)
        self.tasks[task.key] = task
        self._enqueue(task, effects)
        return effects

    def submit_map(
        self,
        key: str,
        fleet: FleetConfig,
        size: int,
        make_element: Callable[[int], TaskRequest],
        concurrency: Optional[int] = None,
        min_success_ratio: float = 1.0,
        retries: int = 0,
        min_successes: Optional[int] = None,
        recovered: Set[int] = frozenset(),
    ) -> List[Effect]:
        """Start an actor map of ``size`` elements; at most ``concurrency`` are queued or running at once (0 or
        None: as many as the fleet runs). Elements in ``recovered`` finished in an earlier attempt: their outputs
        are in that attempt's prefix and they are not run again."""
        if key in self.maps or key in self.tasks:
            return []
        return self._start_map(self._new_map(key, fleet, size, make_element, concurrency, min_success_ratio, retries,
                                             min_successes, set(recovered)))

    def _new_map(self, key: str, fleet: FleetConfig, size: int, make_element: Callable[[int], TaskRequest],
                 concurrency: Optional[int], min_success_ratio: float, retries: int, min_successes: Optional[int],
                 recovered: Set[int]) -> MapJob:
        job = MapJob(
            key=key,
            fleet=fleet,
            size=size,
            make_element=make_element,
            concurrency=concurrency or 0,
            min_success_ratio=min_success_ratio,
            submitted_at=self.clock(),
            retries=retries,
            min_successes=min_successes,
            recovered=recovered,
            outputs=[None] * size,
        )
        for index in job.recovered:
            job.outputs[index] = IN_PREFIX
        job.succeeded = len(job.recovered)
        return job

    def _start_map(self, job: MapJob) -> List[Effect]:
        self.maps[job.key] = job
        effects: List[Effect] = []
        self._use_fleet(job.fleet, effects)
        if job.allowed_failures < 0:
            self._finish_map(job, Phase.FAILED, f"min_successes={job.min_successes} is more than the map's {job.size} "
                             "elements: lower min_successes or map over more elements", effects)
        elif job.succeeded == job.size:
            self._finish_map(job, Phase.SUCCEEDED, f"{job.size} of {job.size} elements succeeded", effects)
        else:
            self._feed_map(job, effects)
        return effects

    def cancel(self, key: str, reason: str = "aborted") -> List[Effect]:
        effects: List[Effect] = []
        job = self.maps.get(key)
        if job is not None:
            if not job.phase.terminal:
                self._finish_map(job, Phase.ABORTED, reason, effects)
            return effects
        task = self.tasks.get(key)
        if task is not None and not task.phase.terminal:
            self._abort_task(task, reason, effects)
            self._announce(task.key, task.finished_at, effects)
        return effects

    def forget(self, key: str) -> None:
        """Drop a finished task or map from memory (after its result was delivered)."""
        job = self.maps.pop(key, None)
        if job is not None:
            return
        task = self.tasks.get(key)
        if task is not None and task.phase.terminal:
            del self.tasks[key]

    # ------------------------------------------------------------------------------------------- replicas

    def replica_connected(
        self, replica_id: str, token: str, fleet_key: str, capacity: int, running: List[str] = (), queue_depth: int = 0
    ) -> List[Effect]:
        """A replica opened its lease stream; raises :class:`ReplicaRefused` if it is not one of ours.

        ``running`` is every lease the replica still holds (running, queued, or reported and not acked yet): a
        lease we hold for it that it does not list never reached it, and is leased again at once. ``queue_depth``:
        leases it takes beyond ``capacity`` (see PREFETCH_PER_SLOT)."""
        replica = self.authenticate(replica_id, token, fleet_key)
        now = self.clock()
        if replica.connected_at is None:
            replica.connected_at = now
        replica.state = ReplicaState.READY
        replica.capacity = max(1, capacity)
        replica.queue_depth = min(queue_depth, replica.capacity * PREFETCH_PER_SLOT)
        replica.last_seen = now
        replica.idle_since = now
        replica.unreported.clear()
        fleet = self.fleets[fleet_key]
        fleet.start_failures = 0
        fleet.killed_starts = 0
        # A reconnecting replica keeps the leases we still hold for it; the rest it must drop.
        for lease_id in running:
            if replica.adopted and lease_id not in self.leases:
                self._recover_lease(replica, lease_id)
            task = self.leases.get(lease_id)
            if task is not None and task.replica_id == replica_id:
                replica.leases.add(lease_id)
        effects: List[Effect] = []
        for lease_id in sorted(replica.leases.difference(running)):
            self._ghost(replica, lease_id, effects)
        self._dispatch(fleet, effects)
        return effects

    def authenticate(self, replica_id: str, token: str, fleet_key: str) -> Replica:
        """The replica if ``token`` is its token and it may connect; else raises :class:`ReplicaRefused`."""
        replica = self.replicas.get(replica_id)
        if replica is None or not secrets.compare_digest(replica.token, token) or replica.fleet_key != fleet_key:
            raise ReplicaRefused(f"replica {replica_id[:64]!r} of {fleet_key[:200]!r} is unknown or its token is wrong")
        if replica.state is ReplicaState.STOPPING:
            raise ReplicaRefused(f"replica {replica_id!r} is being stopped")
        return replica

    def adopt_replica(self, replica_id: str, token: str, fleet: FleetConfig) -> None:
        """Take back a replica a previous agent launched (after a restart); it counts as starting until it
        connects and reports what it runs."""
        if replica_id in self.replicas:
            return
        fleet_state = self.fleets.get(fleet.key)
        if fleet_state is None:
            fleet_state = self.fleets[fleet.key] = Fleet(config=fleet)
        replica = Replica(id=replica_id, token=token, fleet_key=fleet.key, launched_at=self.clock(), adopted=True)
        fleet_state.replicas[replica_id] = replica
        self.replicas[replica_id] = replica

    def _recover_lease(self, replica: Replica, lease_id: str) -> Optional[TaskState]:
        """An adopted replica runs (or ran) ``lease_id``, which this agent never issued: rebuild its task from
        the key in the lease id, so GetTask finds it and the replica's report completes it. Only a lease id
        signed by the agent's key for this replica counts: a forged or borrowed claim is abandoned. Not when the
        key, or the actor map it is an element of, is known already: then the lease is stale."""
        key = self.lease_ids.verify(replica.id, lease_id)
        parent = _element_of(key)[0] if key else ""
        if not key or key in self.tasks or key in self.maps or parent in self.maps or parent in self.tasks:
            return None
        task = TaskState(
            key=key, fleet_key=replica.fleet_key, payload=None, timeout_seconds=0.0, name=key,
            submitted_at=self.clock(), phase=Phase.RUNNING, lease_id=lease_id, replica_id=replica.id, leases=1,
            started_at=self.clock(),
        )
        self.tasks[key] = task
        self.leases[lease_id] = task
        return task

    def resume(self, request: TaskRequest, stored_outputs: Optional[bytes] = None) -> List[Effect]:
        """Take back a task the connector rebuilt from its record after a restart. If an adopted replica
        brought it back with its lease, it only gets its payload (so a lost lease queues it again); if its outputs
        were stored, it succeeded; else it is queued."""
        task = self.tasks.get(request.key)
        if task is not None or request.key in self.maps:
            if task is not None and task.payload is None and not task.phase.terminal:
                task.payload, task.timeout_seconds, task.name = request.payload, request.timeout_seconds, request.name
            return []
        if stored_outputs is None:
            return self.submit(request)
        effects: List[Effect] = []
        task = self._new_task(request)
        self.tasks[task.key] = task
        self._finish_task(task, Phase.SUCCEEDED, "finished while the agent restarted", effects, outputs=stored_outputs)
        return effects

    def resume_map(
        self,
        key: str,
        fleet: FleetConfig,
        size: int,
        make_element: Callable[[int], TaskRequest],
        concurrency: Optional[int] = None,
        min_success_ratio: float = 1.0,
        retries: int = 0,
        min_successes: Optional[int] = None,
        recovered: Set[int] = frozenset(),
        done: Set[int] = frozenset(),
    ) -> List[Effect]:
        """Take back an actor map the connector rebuilt after a restart: elements in ``done`` (their outputs.pb is
        in this map's prefix) or ``recovered`` (an earlier attempt's) are not run again, elements adopted replicas
        brought back with their leases (keys ``<key>/<i>``) join the map as they are, the rest run."""
        if key in self.maps or key in self.tasks:
            return []
        job = self._new_map(key, fleet, size, make_element, concurrency, min_success_ratio, retries, min_successes,
                            set(recovered) | {i for i in done if i < size})
        for index, task in [(_element_of(k)[1], t) for k, t in self.tasks.items() if _element_of(k)[0] == key]:
            del self.tasks[task.key]
            if index >= size or index in job.recovered:
                continue
            if task.phase is Phase.SUCCEEDED:
                job.outputs[index] = task.outputs if task.outputs is not None else IN_PREFIX
                job.succeeded += 1
                job.resumed.add(index)
            elif not task.phase.terminal:
                request = make_element(index)
                task.payload, task.timeout_seconds, task.name = request.payload, request.timeout_seconds, request.name
                task.parent, task.index = job, index
                job.in_flight[index] = task
                job.resumed.add(index)
        return self._start_map(job)

    def tombstone(self, key: str, reason: str) -> List[Effect]:
        """DeleteTask for a task this agent does not know: remember it as aborted, so that a replica that
        reconnects with its lease is told to drop it instead of bringing it back."""
        if key in self.tasks or key in self.maps:
            return self.cancel(key, reason)
        effects: List[Effect] = []
        task = TaskState(key=key, fleet_key="", payload=None, timeout_seconds=0.0, name=key,
                         submitted_at=self.clock(), phase=Phase.ABORTED, message=reason, finished_at=self.clock())
        self.tasks[key] = task
        self._announce(key, task.finished_at, effects)
        for element in [k for k in self.tasks if _element_of(k)[0] == key]:
            effects.extend(self.cancel(element, reason))  # elements adopted replicas brought back
        return effects

    def abandoned_leases(self, replica_id: str, running: List[str]) -> List[str]:
        replica = self.replicas.get(replica_id)
        held = replica.leases if replica else set()
        return [lease for lease in running if lease not in held]

    def heartbeat(self, replica_id: str, running: Optional[List[str]] = None) -> List[Effect]:
        """The replica is alive and runs ``running``: reconcile that with the leases we hold for it. A lease it
        runs that we do not hold is cancelled on it; a lease we hold that it has not listed for ``ghost_grace``
        never reached it (its stream lost bytes): the task is leased again and the stream closed."""
        effects: List[Effect] = []
        replica = self.replicas.get(replica_id)
        if replica is None:
            return effects
        now = self.clock()
        replica.last_seen = now
        if running is None or replica.state is not ReplicaState.READY:
            return effects
        listed = set(running)
        for lease_id in sorted(listed - replica.leases):
            effects.append(CancelLease(replica_id, lease_id, "the agent does not hold this lease"))
        replica.unreported = {
            lease_id: replica.unreported.get(lease_id, now) for lease_id in replica.leases if lease_id not in listed
        }
        ghosts = sorted(lease for lease, since in replica.unreported.items() if now - since >= self.ghost_grace)
        if ghosts:
            # Disconnected first, so that the re-queued tasks are not leased to it again on the broken stream.
            replica.state = ReplicaState.DISCONNECTED
            replica.disconnected_at = now
            effects.append(Disconnect(replica_id, f"leases {ghosts} never reached it"))
            for lease_id in ghosts:
                self._ghost(replica, lease_id, effects)
        return effects

    def _ghost(self, replica: Replica, lease_id: str, effects: List[Effect]) -> None:
        """``lease_id`` never reached ``replica``: free its slot and lease the task again."""
        replica.leases.discard(lease_id)
        replica.unreported.pop(lease_id, None)
        task = self.leases.get(lease_id)
        if task is not None and task.replica_id == replica.id:
            del self.leases[lease_id]
            self._lease_lost(task, f"lease {lease_id} never reached replica {replica.id}", effects)

    def stream_lost(self, replica_id: str) -> List[Effect]:
        """The replica's lease stream ended. A ready replica keeps its leases for ``reconnect_grace`` seconds,
        waiting for it to reconnect; one being stopped is gone."""
        replica = self.replicas.get(replica_id)
        if replica is None or replica.state is ReplicaState.DISCONNECTED:
            return []
        if replica.state is ReplicaState.READY:
            replica.state = ReplicaState.DISCONNECTED
            replica.disconnected_at = self.clock()
            return []
        return self.replica_gone(replica_id, ReplicaExit(ExitReason.STREAM_CLOSED, "its lease stream closed"))

    def replica_gone(self, replica_id: str, exit: ReplicaExit) -> List[Effect]:
        """The replica's stream broke, its process exited or its pod went away."""
        effects: List[Effect] = []
        self._replica_gone(replica_id, exit, effects)
        return effects

    def _replica_gone(self, replica_id: str, exit: ReplicaExit, effects: List[Effect]) -> None:
        replica = self.replicas.pop(replica_id, None)
        if replica is None:
            return
        cause = exit.detail
        fleet = self.fleets[replica.fleet_key]
        fleet.replicas.pop(replica_id, None)
        if replica.state is not ReplicaState.STOPPING or exit.reason is ExitReason.NO_HEARTBEAT:
            fleet.last_replica_failure, fleet.last_replica_failure_at = exit, self.clock()
        if replica.state is ReplicaState.STARTING and not replica.adopted:
            if exit.reason in (ExitReason.KILLED, ExitReason.DELETED) and fleet.killed_starts < self.killed_start_limit:
                fleet.killed_starts += 1  # someone else's signal or deletion, not the image: start another
            else:
                fleet.start_failures += 1
                if exit.reason is ExitReason.REFUSED:
                    fleet.start_failures = max(fleet.start_failures, self.start_failure_limit)
                fleet.last_start_error = cause
            if self._cannot_start(fleet):
                fleet.failed_at = self.clock()
                self._fail_queue(fleet, self._start_error(fleet), effects)
        for lease_id in sorted(replica.leases):
            task = self.leases.pop(lease_id, None)
            if task is not None and not task.phase.terminal:
                self._lease_lost(task, f"replica {replica_id} was lost: {cause}", effects)
        if replica.state is not ReplicaState.STOPPING or fleet.queue:
            self._scale(fleet, effects)

    def replica_waiting(self, replica_id: str, reason: Optional[str]) -> List[Effect]:
        """A starting replica waits for resources (``reason``), or no longer does (``None``): its start timeout
        then counts from now."""
        replica = self.replicas.get(replica_id)
        if replica is None or replica.state is not ReplicaState.STARTING:
            return []
        if not reason and replica.waiting:
            replica.launched_at = self.clock()
        replica.waiting = reason or ""
        return []

    def waiting_reason(self, fleet_key: str) -> str:
        """Why a fleet with no ready replica waits, as its starting replicas report it ('' if they do not)."""
        fleet = self.fleets.get(fleet_key)
        reasons = [r.waiting for r in fleet.replicas.values() if r.waiting] if fleet else []
        return reasons[0] if reasons else ""

    def stop_replica(self, replica_id: str, reason: str) -> List[Effect]:
        effects: List[Effect] = []
        self._stop_replica(replica_id, reason, effects)
        return effects

    def _stop_replica(self, replica_id: str, reason: str, effects: List[Effect]) -> None:
        replica = self.replicas.get(replica_id)
        if replica is not None and replica.state is not ReplicaState.STOPPING:
            replica.state = ReplicaState.STOPPING
            effects.append(Stop(replica_id, reason))

    # --------------------------------------------------------------------------------------------- reports

    def report(
        self,
        replica_id: str,
        lease_id: str,
        outcome: Outcome,
        outputs: Optional[bytes] = None,
        error: Optional[bytes] = None,
        message: str = "",
        retryable: bool = False,
        outputs_size: int = 0,
        system_error: bool = False,
        stored_at: str = "",
    ) -> List[Effect]:
        """A replica reports how a lease ended. Always acked; ignored unless the lease is still current and held
        by ``replica_id`` (no replica reports for another). ``outputs`` None on success: they are only in the
        task's output prefix (too large to send). ``stored_at``: a map element's outputs are stored in this file
        (an element group, see element_groups.py) rather than in its output prefix."""
        effects: List[Effect] = [Ack(replica_id, lease_id)]
        replica = self.replicas.get(replica_id)
        now = self.clock()
        if replica is not None:
            replica.last_seen = now
            if outcome is not Outcome.CANCELLED:
                replica.progress_at, replica.recalled = now, False
            if lease_id in replica.leases:
                replica.leases.discard(lease_id)
                replica.tasks_run += 1
                if not replica.leases:
                    replica.idle_since = now
        task = self.leases.get(lease_id)
        if task is not None and task.replica_id != replica_id:
            task = None
        elif task is not None:
            del self.leases[lease_id]
        elif replica is not None and replica.adopted and outcome in (Outcome.SUCCEEDED, Outcome.FAILED):
            # A result the replica kept for the previous agent: take it rather than run the task again.
            task = self._recover_lease(replica, lease_id)
            self.leases.pop(lease_id, None)
        if task is not None and task.lease_id == lease_id and not task.phase.terminal:
            if outcome is Outcome.SUCCEEDED and self.max_output_bytes and outputs_size > self.max_output_bytes:
                self._finish_task(task, Phase.FAILED, (
                    f"Task {task.name or task.key} returned {outputs_size} bytes of outputs, more than the actor "
                    f"agent's cap of {self.max_output_bytes} bytes (flyte-actor-agent --max-output-bytes, "
                    "FLYTE_ACTOR_MAX_OUTPUT_BYTES): return less, or raise the cap"), effects)
            elif outcome is Outcome.SUCCEEDED:
                self._finish_task(task, Phase.SUCCEEDED, message, effects,
                                  outputs=IN_PREFIX if outputs is None else outputs, stored_at=stored_at)
            elif outcome is Outcome.FAILED and retryable and self._retry_element(task, message, system_error, effects):
                pass
            elif outcome is Outcome.FAILED:
                if replica is not None:
                    replica.last_failure = f"{task.name or task.key}: {message}"
                phase = Phase.RETRYABLE_FAILED if retryable else Phase.FAILED
                self._finish_task(task, phase, message, effects, error=error)
            elif outcome is Outcome.LOST:
                if replica is not None:
                    replica.last_failure = f"{task.name or task.key}: {message or 'its executor died'}"
                self._lease_lost(task, message or f"the executor on replica {replica_id} died", effects)
            elif task.payload is None or task.given_back >= GIVE_BACK_LIMIT:
                # Given back, but an agent restart lost what it needs to run again, or given back over and over
                # (a replica that misbehaves): count it as lost.
                self._lease_lost(task, message or f"replica {replica_id} gave the task back", effects)
            else:  # given back unstarted (a queued lease the replica will not run): lease it again, no failure
                task.given_back += 1
                self._requeue(task)
                self._enqueue(task, effects, front=True)
        if replica is not None and replica.state is ReplicaState.READY:
            fleet = self.fleets[replica.fleet_key]
            self._dispatch(fleet, effects)
            if fleet.superseded and not replica.leases and not fleet.queue:
                self._stop_replica(replica.id, f"environment {fleet.config.name!r} has a new version", effects)
        return effects

    # ------------------------------------------------------------------------------------------------ time

    def tick(self) -> List[Effect]:
        """Act on everything due by now: lease deadlines, silent replicas, idle replicas past their TTL."""
        now = self.clock()
        effects: List[Effect] = []
        while self._finished and self._finished[0][0] + self.retain <= now:
            self.forget(self._finished.popleft()[1])
        for task in [t for t in self.leases.values() if t.deadline is not None and t.deadline <= now]:
            if self.leases.get(task.lease_id) is not task:
                continue  # already ended by an earlier one in this loop (its actor map ended)
            effects.append(CancelLease(task.replica_id, task.lease_id, "timed out"))
            self.leases.pop(task.lease_id, None)
            message = (f"Task {task.name or task.key} did not finish within its timeout of {task.timeout_seconds:g}s "
                       f"(replica {task.replica_id} did not report it in time).")
            if not self._retry_element(task, message, False, effects):
                self._finish_task(task, Phase.RETRYABLE_FAILED, message, effects)
        for replica in list(self.replicas.values()):
            if replica.state is ReplicaState.STARTING and replica.waiting:
                continue
            if replica.state is ReplicaState.STARTING and now - replica.launched_at >= self.start_timeout:
                effects.append(Stop(replica.id, "did not connect in time"))
                self._replica_gone(replica.id, ReplicaExit(
                    ExitReason.START_TIMEOUT,
                    f"replica {replica.id} did not connect within {self.start_timeout:g}s of its launch"), effects)
            elif replica.state is ReplicaState.DISCONNECTED and now - replica.disconnected_at >= self.reconnect_grace:
                replica.state = ReplicaState.STOPPING
                effects.append(Stop(replica.id, "did not reconnect"))
                self._replica_gone(replica.id, ReplicaExit(
                    ExitReason.STREAM_CLOSED,
                    f"its lease stream closed and it did not reconnect within {self.reconnect_grace:g}s"), effects)
            elif replica.state is ReplicaState.READY and now - replica.last_seen > self.heartbeat_timeout:
                replica.state = ReplicaState.STOPPING
                effects.append(Stop(replica.id, "no heartbeat"))
                self._replica_gone(replica.id, ReplicaExit(
                    ExitReason.NO_HEARTBEAT, f"no heartbeat for {now - replica.last_seen:.0f}s"), effects)
            elif (due := self._recall_due(replica)) is not None and due <= now:
                replica.recalled = True
                effects.append(Recall(replica.id, (
                    f"replica {replica.id} reported no result for {now - replica.progress_at:.1f}s while tasks "
                    "waited in its queue: they run elsewhere")))
            elif replica.state is ReplicaState.READY and not replica.leases:
                fleet = self.fleets[replica.fleet_key]
                if now - replica.idle_since >= fleet.config.ttl_seconds and not fleet.queue:
                    self._stop_replica(replica.id, f"idle for {fleet.config.ttl_seconds:g}s (ttl_seconds)", effects)
        return effects

    def next_deadline(self) -> Optional[float]:
        """When ``tick`` next has something to do, so the caller can sleep exactly until then."""
        times = [t.deadline for t in self.leases.values() if t.deadline is not None]
        if self._finished:
            times.append(self._finished[0][0] + self.retain)
        for replica in self.replicas.values():
            if replica.state is ReplicaState.STARTING and not replica.waiting:
                times.append(replica.launched_at + self.start_timeout)
            elif replica.state is ReplicaState.DISCONNECTED:
                times.append(replica.disconnected_at + self.reconnect_grace)
            elif replica.state is ReplicaState.READY:
                times.append(replica.last_seen + self.heartbeat_timeout)
                recall = self._recall_due(replica)
                if recall is not None:
                    times.append(recall)
                if not replica.leases:
                    times.append(replica.idle_since + self.fleets[replica.fleet_key].config.ttl_seconds)
        return min(times) if times else None

    @staticmethod
    def _recall_due(replica: Replica) -> Optional[float]:
        """When the leases queued on ``replica`` are to be recalled (None: it holds none, or they were)."""
        if replica.state is not ReplicaState.READY or replica.recalled or len(replica.leases) <= replica.capacity:
            return None
        return replica.progress_at + RECALL_AFTER_SECONDS

    def drain(self) -> List[Effect]:
        """Stop everything: used at shutdown. Queued and running tasks fail as retryable."""
        self.draining = True
        effects: List[Effect] = []
        for job in list(self.maps.values()):
            if not job.phase.terminal:
                self._finish_map(job, Phase.RETRYABLE_FAILED, "the actor agent shut down", effects)
        for task in list(self.tasks.values()):
            if not task.phase.terminal:
                self._abort_task(task, "the actor agent shut down", effects, Phase.RETRYABLE_FAILED)
                self._announce(task.key, task.finished_at, effects)
        for replica in list(self.replicas.values()):
            self._stop_replica(replica.id, "the actor agent shut down", effects)
        return effects

    # ------------------------------------------------------------------------------------------- internals

    def _use_fleet(self, config: FleetConfig, effects: List[Effect]) -> None:
        """Make ``config``'s fleet the current version of its environment: older versions' replicas stop when
        idle."""
        fleet = self.fleets.get(config.key)
        if fleet is None:
            fleet = self.fleets[config.key] = Fleet(config=config)
        elif config.replica_count != fleet.config.replica_count or config.ttl_seconds != fleet.config.ttl_seconds:
            fleet.config = config  # the latest registration decides the fleet's size and TTL
        fleet.superseded = False
        for other in self.fleets.values():
            if other is not fleet and other.config.lineage == config.lineage and config.lineage and not other.superseded:
                other.superseded = True
                for replica in list(other.replicas.values()):
                    if replica.state is ReplicaState.READY and not replica.leases and not other.queue:
                        self._stop_replica(replica.id, f"environment {config.name!r} has a new version", effects)

    def _new_task(self, request: TaskRequest, parent: Optional[MapJob] = None, index: int = 0) -> TaskState:
        return TaskState(
            key=request.key,
            fleet_key=request.fleet.key,
            payload=request.payload,
            timeout_seconds=request.timeout_seconds,
            name=request.name,
            submitted_at=self.clock(),
            parent=parent,
            index=index,
        )

    def _enqueue(self, task: TaskState, effects: List[Effect], front: bool = False) -> None:
        fleet = self.fleets[task.fleet_key]
        task.phase = Phase.QUEUED
        if self.draining:
            self._finish_task(task, Phase.RETRYABLE_FAILED, "the actor agent is shutting down", effects)
            return
        if self._cannot_start(fleet) and self.clock() - fleet.failed_at < self.start_retry_after:
            self._finish_task(task, Phase.FAILED, self._start_error(fleet), effects)
            return
        if front:
            fleet.queue.appendleft(task)
        else:
            fleet.queue.append(task)
        self._dispatch(fleet, effects)
        self._scale(fleet, effects)

    def _cannot_start(self, fleet: Fleet) -> bool:
        return fleet.start_failures >= self.start_failure_limit and not any(
            r.state is ReplicaState.READY for r in fleet.replicas.values()
        )

    def _start_error(self, fleet: Fleet) -> str:
        return (
            f"Replicas of actor environment {fleet.config.name!r} cannot start ({fleet.start_failures} tries): "
            f"{fleet.last_start_error}"
        )

    def _dispatch(self, fleet: Fleet, effects: List[Effect]) -> None:
        """Give queued tasks to the busiest ready replica with a free slot, so idle ones can expire; a map
        element that failed goes to another replica than last time when one has a free slot. When every slot is
        taken, elements of a quick map are queued on the replicas that queue leases, the least loaded first."""
        while fleet.queue:
            task = fleet.queue[0]
            if task.phase is not Phase.QUEUED:
                fleet.queue.popleft()
                continue
            best = self._free_slot(fleet, task.avoid_replica)
            queued = 0  # leased beyond free slots: at most this many per slot
            if best is None and task.parent is not None and task.parent.quick:
                queued = PREFETCH_PER_SLOT
            elif best is None and task.parent is None and fleet.very_quick(task.name):
                queued = TASK_PREFETCH_PER_SLOT
            if queued:
                best = self._queue_slot(fleet, task.avoid_replica, queued)
            if best is None:
                return
            fleet.queue.popleft()
            if queued:
                best.refilling = len(best.leases) + 1 < self._queue_limit(best, queued)
            now = self.clock()
            lease_id = self.lease_ids.issue(self.new_id(), best.id, task.key)
            task.phase = Phase.RUNNING
            task.lease_id = lease_id
            task.replica_id = best.id
            task.leases += 1
            task.started_at = task.started_at or now
            task.leased_at = now
            task.deadline = now + task.timeout_seconds + self.lease_grace if task.timeout_seconds else None
            if not best.leases:
                best.progress_at = now
            best.leases.add(lease_id)
            self.leases[lease_id] = task
            effects.append(Assign(best.id, lease_id, task))

    @staticmethod
    def _free_slot(fleet: Fleet, avoid: Optional[str]) -> Optional[Replica]:
        best: Optional[Replica] = None
        other: Optional[Replica] = None
        for replica in fleet.replicas.values():
            if replica.state is ReplicaState.READY and len(replica.leases) < replica.capacity:
                if best is None or len(replica.leases) > len(best.leases):
                    best = replica
                if replica.id != avoid and (other is None or len(replica.leases) > len(other.leases)):
                    other = replica
        return other or best

    @staticmethod
    def _queue_limit(replica: Replica, per_slot: int) -> int:
        return replica.capacity + min(replica.queue_depth, replica.capacity * per_slot)

    @classmethod
    def _queue_slot(cls, fleet: Fleet, avoid: Optional[str], per_slot: int) -> Optional[Replica]:
        """The least loaded ready replica that queues leases and has room for another. A replica's queue is topped
        up once it is half empty (then up to full), not each time a lease ends: several leases in one message, and
        the results of several in the time between."""
        best: Optional[Replica] = None
        for replica in fleet.replicas.values():
            limit = cls._queue_limit(replica, per_slot)
            if (replica.state is ReplicaState.READY and replica.id != avoid and not replica.recalled
                    and len(replica.leases) < limit
                    and (replica.refilling or len(replica.leases) <= replica.capacity + (limit - replica.capacity) // 2)
                    and (best is None or len(replica.leases) < len(best.leases))):
                best = replica
        return best

    def _scale(self, fleet: Fleet, effects: List[Effect]) -> None:
        """Launch replicas for the work at hand, up to ``replica_count``; never scale down (TTL does)."""
        if self.draining:
            return
        running = sum(len(r.leases) for r in fleet.replicas.values())
        demand = len(fleet.queue) + running
        desired = min(fleet.config.replica_count, math.ceil(demand / max(1, fleet.config.parallelism)))
        alive = [r for r in fleet.replicas.values() if r.state is not ReplicaState.STOPPING]
        for _ in range(desired - len(alive)):
            replica = Replica(id=self.new_id(), token=self.new_token(), fleet_key=fleet.config.key, launched_at=self.clock())
            fleet.replicas[replica.id] = replica
            self.replicas[replica.id] = replica
            effects.append(Launch(replica.id, replica.token, fleet.config))

    @staticmethod
    def _requeue(task: TaskState) -> None:
        """Take the task's lease back; its next lease goes to another replica when one has room."""
        task.avoid_replica = task.replica_id
        task.lease_id = None
        task.replica_id = None
        task.deadline = None

    def _lease_lost(self, task: TaskState, cause: str, effects: List[Effect]) -> None:
        """A system failure (replica or executor lost): lease again, up to ``max_leases`` system failures."""
        self._requeue(task)
        task.system_failures += 1
        if task.payload is None:
            self._finish_task(task, Phase.RETRYABLE_FAILED, f"Task {task.key} was lost after an agent restart: {cause}", effects)
        elif task.system_failures >= self.max_leases:
            self._finish_task(
                task,
                Phase.RETRYABLE_FAILED,
                f"Task {task.name or task.key} was lost {task.system_failures} times; last: {cause}",
                effects,
            )
        else:
            if task.parent is not None:
                task.parent.retried += 1
            self._enqueue(task, effects, front=True)

    def _retry_element(self, task: TaskState, message: str, system: bool, effects: List[Effect]) -> bool:
        """A map element failed in a retryable way: run it again on its own, as Flyte's ArrayNode retries a
        sub-node. System errors count against ``max_leases`` (Flyte: max-node-retries-system-failures), user
        errors against the task's ``retries``. False when it is not an element or its budget is spent."""
        job = task.parent
        if job is None or job.phase.terminal or task.payload is None:
            return False
        if system:
            if task.system_failures + 1 >= self.max_leases:
                return False
            task.system_failures += 1
        else:
            if task.user_failures >= job.retries:
                return False
            task.user_failures += 1
        self._requeue(task)
        task.message = message
        job.retried += 1
        self._enqueue(task, effects, front=True)
        return True

    def _fail_queue(self, fleet: Fleet, message: str, effects: List[Effect]) -> None:
        while fleet.queue:
            task = fleet.queue.popleft()
            if task.phase is Phase.QUEUED:
                self._finish_task(task, Phase.FAILED, message, effects)

    def _abort_task(self, task: TaskState, reason: str, effects: List[Effect], phase: Phase = Phase.ABORTED) -> None:
        if task.phase is Phase.QUEUED:
            fleet = self.fleets[task.fleet_key]
            try:
                fleet.queue.remove(task)
            except ValueError:
                pass
        elif task.phase is Phase.RUNNING and task.lease_id is not None:
            # The replica keeps the slot until it reports the lease cancelled; its late report is only acked.
            effects.append(CancelLease(task.replica_id, task.lease_id, reason))
            self.leases.pop(task.lease_id, None)
        task.phase = phase
        task.message = reason
        task.finished_at = self.clock()

    def _announce(self, key: str, finished_at: float, effects: List[Effect]) -> None:
        """A task or map of ``key`` ended: wake its waiters, and forget its result after ``retain``."""
        self._finished.append((finished_at, key))
        effects.append(Finished(key))

    def _finish_task(
        self,
        task: TaskState,
        phase: Phase,
        message: str,
        effects: List[Effect],
        outputs: Optional[bytes] = None,
        error: Optional[bytes] = None,
        stored_at: str = "",
    ) -> None:
        task.phase = phase
        task.message = message
        task.outputs = outputs
        task.error = error
        task.finished_at = self.clock()
        task.deadline = None
        task.payload = None  # inputs can be large; a finished task is only read for its result
        if task.parent is None:
            fleet = self.fleets.get(task.fleet_key)
            if fleet is not None and task.leased_at is not None and phase is not Phase.ABORTED:
                fleet.task_finished(task.name, task.finished_at - task.leased_at)
            self._announce(task.key, task.finished_at, effects)
        else:
            self._element_finished(task.parent, task, effects, stored_at)

    # ------------------------------------------------------------------------------------------- actor maps

    def _feed_map(self, job: MapJob, effects: List[Effect]) -> None:
        config = self.fleets[job.fleet.key].config
        per_slot = QUICK_MAP_WINDOW_PER_SLOT if job.very_quick else MAP_WINDOW_PER_SLOT
        window = max(1, config.replica_count * config.parallelism * per_slot)
        limit = min(job.concurrency, window) if job.concurrency else window
        while job.phase is Phase.RUNNING and job.next_index < job.size and len(job.in_flight) < limit:
            index = job.next_index
            job.next_index += 1
            if index in job.recovered or index in job.resumed:
                continue
            task = self._new_task(job.make_element(index), parent=job, index=index)
            if isinstance(task.payload, (bytes, bytearray)):
                job.largest_element_bytes = max(job.largest_element_bytes, len(task.payload))
            job.in_flight[index] = task
            self._enqueue(task, effects)

    def _element_finished(self, job: MapJob, task: TaskState, effects: List[Effect], stored_at: str = "") -> None:
        job.in_flight.pop(task.index, None)
        if job.phase.terminal:
            return
        if task.leased_at is not None and task.finished_at is not None:
            seconds = task.finished_at - task.leased_at
            job.element_seconds = _moving_average(job.element_seconds, seconds)
        if task.phase is Phase.SUCCEEDED:
            job.succeeded += 1
            outputs = task.outputs
            if isinstance(outputs, bytes):
                if job.inline_bytes + len(outputs) > self.map_inline_budget:
                    # Stored as well: in an element group, or by flytekit in the element's prefix.
                    outputs = stored_at or IN_PREFIX
                else:
                    job.inline_bytes += len(outputs)
            job.outputs[task.index] = outputs
        else:
            job.failed += 1
            if len(job.errors) < MAP_ERRORS_KEPT:
                job.errors[task.index] = task.message
            if job.failed > job.allowed_failures:
                phase = Phase.RETRYABLE_FAILED if task.phase is Phase.RETRYABLE_FAILED else Phase.FAILED
                self._finish_map(
                    job,
                    phase,
                    f"{job.failed} of {job.size} elements failed, more than {job.tolerance} allows; element "
                    f"{task.index}: {task.message}",
                    effects,
                )
                return
        if job.succeeded + job.failed == job.size:
            self._finish_map(job, Phase.SUCCEEDED, f"{job.succeeded} of {job.size} elements succeeded", effects)
        else:
            self._feed_map(job, effects)

    def _finish_map(self, job: MapJob, phase: Phase, message: str, effects: List[Effect]) -> None:
        job.phase = phase
        job.message = message
        job.finished_at = self.clock()
        for task in list(job.in_flight.values()):
            self._abort_task(task, f"actor map {job.key} ended: {message}", effects)
        job.in_flight.clear()
        self._announce(job.key, job.finished_at, effects)
