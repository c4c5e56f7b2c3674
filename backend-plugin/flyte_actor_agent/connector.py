"""The Flyte connector for actor tasks and actor maps: turns CreateTask/GetTask/DeleteTask into agent calls.

``create`` queues the task and returns at once (propeller gives it a few seconds); it is idempotent for one task
execution id and retry attempt, so a retried CreateTask does not run the task twice. ``get`` answers from the
agent's memory. ``delete`` cancels. Phases map as follows:

=====================================  ================================================================
agent                                  Flyte
=====================================  ================================================================
queued, waiting for replicas           ``QUEUED`` (``WAITING_FOR_RESOURCES``, with the pods' reason, while no
                                       replica is ready)
leased to a replica                    ``RUNNING``, with log links to the replica's pod (an actor map: also
                                       while its outputs are written)
succeeded                              ``SUCCEEDED`` with the outputs inline when small; otherwise
                                       without them, and propeller reads ``outputs.pb`` from the prefix
user error                             ``FAILED`` (not retried)
system error, timeout, replica lost    ``RETRYABLE_FAILED`` (retried within the task's retries)
cancelled                              ``ABORTED``
=====================================  ================================================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from flyteidl.core import literals_pb2
from flytekit.extend.backend.base_connector import AsyncConnectorBase, Resource, ResourceMeta
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit.models.literals import Literal, LiteralCollection, LiteralMap, Scalar, Void
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from flytekitplugins.actor.protocol import element_groups, lease_pb2
from flytekitplugins.actor.contract import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE, ActorCustom, TaskCommand

from . import logs
from . import outputs as blob
from . import scheduler as core
from .launchers.k8s_config import LogConfig
from .placement import Placement, execution_id, fleet_config
from .reactor import Reactor
from .recovery import META_VERSION, TaskRecord, TaskRecords, record_uri
from .views import TaskView

_PHASES = {
    core.Phase.QUEUED: TaskExecution.QUEUED,
    core.Phase.RUNNING: TaskExecution.RUNNING,
    core.Phase.SUCCEEDED: TaskExecution.SUCCEEDED,
    core.Phase.FAILED: TaskExecution.FAILED,
    core.Phase.RETRYABLE_FAILED: TaskExecution.RETRYABLE_FAILED,
    core.Phase.ABORTED: TaskExecution.ABORTED,
}
log = logging.getLogger("flyte-actor-agent")
#: Task inputs up to this size travel inline on the lease stream; larger ones go by URI (``inputs_uri``).
INLINE_INPUT_BYTES = 4 * 1024 * 1024
#: A literal given to every element of a map (a bound input), or one element's input, larger than this is
#: offloaded to the blob store once (a flytekit offloaded literal, which flytekit loads in the replica).
OFFLOAD_LITERAL_BYTES = 1024 * 1024
#: How long GetTask waits for a finished map's outputs to be written before answering RUNNING (propeller's
#: deadline for the call is 3s); the writing goes on and a later GetTask answers SUCCEEDED.
ASSEMBLY_WAIT_SECONDS = 1.5
#: CreateTask of a map's attempt N > 0 lists earlier attempts' prefixes for finished elements for at most this
#: long (propeller's deadline for the call is 3 s); past it, the map runs every element.
RECOVERY_SCAN_SECONDS = 1.5


@dataclass
class ActorMetadata(ResourceMeta):
    """What propeller keeps between calls, in etcd, so small whatever the map size: the schema version, the
    task's key in the agent, where CreateTask stored the task's record (``""``: not stored; see recovery.py), and
    what ``get`` needs to shape an actor map's outputs (its output names, comma-separated, and whether failed
    elements become ``None``)."""

    key: str
    map_outputs: str = ""
    optional_outputs: bool = False
    #: An actor map's output prefix: where its elements' outputs are and where its own outputs.pb goes.
    output_prefix: str = ""
    version: int = META_VERSION
    record: str = ""
    #: Set by :meth:`decode` only, never stored: why these bytes are not a meta this agent can act on.
    problem: str = ""

    def encode(self) -> bytes:
        stored = asdict(self)
        del stored["problem"]
        return json.dumps(stored, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "ActorMetadata":
        """Never raises: a meta that does not parse, or that another schema version wrote, comes back with
        ``problem`` set, so GetTask answers a clear permanent failure instead of an internal error."""
        try:
            stored = json.loads(data.decode("utf-8"))
            if not isinstance(stored, dict) or not isinstance(stored.get("key"), str):
                raise ValueError("it has no task key")
        except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
            return cls(key="", problem=f"The actor task's resource meta does not parse ({e}): {data[:120]!r}. It "
                       "was not written by flyte-actor-agent; run the workflow again.")
        version = stored.get("version", 1)  # agents before task records wrote no version
        if version != META_VERSION:
            return cls(key=stored["key"], version=version if isinstance(version, int) else -1, problem=(
                f"The actor task's resource meta has schema version {version!r}, and this flyte-actor-agent reads "
                f"version {META_VERSION}: an agent of another version created task {stored['key']} and this one "
                "cannot rebuild it. Run the workflow again (or roll the agent back to finish it)."))
        names = {f.name for f in fields(cls)} - {"problem"}
        return cls(**{k: v for k, v in stored.items() if k in names})


@dataclass
class _Submission:
    """A task or an actor map as CreateTask builds it: ready to submit, or after a restart to resume."""

    meta: ActorMetadata
    output_prefix: str
    request: Optional[core.TaskRequest] = None
    #: An actor map's (fleet, size, make_element, concurrency, min_success_ratio), and its other options.
    map_args: Tuple = ()
    map_kwargs: Dict[str, Any] = field(default_factory=dict)


class ActorConnector(AsyncConnectorBase):
    """``records``: where CreateTask stores what rebuilds a task after a restart (None: nothing is stored,
    as for local runs, whose agent lives and dies with the run)."""

    name = "Actor Connector"

    def __init__(self, agent: Callable[[], Reactor], task_type_name: str = ACTOR_TASK_TYPE,
                 log_config: Optional[LogConfig] = None, records: Optional[TaskRecords] = None):
        super().__init__(task_type_name=task_type_name, metadata_type=ActorMetadata)
        self._agent = agent
        self._records = records
        self.log_config = log_config or LogConfig()
        #: Per actor map: elements finished before this agent ran it (recovered from earlier attempts, or done
        #: before a restart): index -> the file that holds its outputs.
        self._recovered: Dict[str, Dict[int, str]] = {}
        #: Per finished actor map: when its outputs were first asked for, and their writing (which gives the
        #: serialized outputs when small, else None). Forgotten with the map, or after core.RETAIN_SECONDS.
        self._published: Dict[str, Tuple[float, concurrent.futures.Future]] = {}
        self._writer = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="actor-map-outputs")

    async def create(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Union[LiteralMap, literals_pb2.LiteralMap, None] = None,
        task_execution_metadata: Optional[TaskExecutionMetadata] = None,
        **kwargs,
    ) -> ActorMetadata:
        """``inputs`` as flytekit's model or as the protobuf message (the agent's server passes the message: a
        map's inputs can hold 100,000 literals, too many to convert within propeller's deadline)."""
        agent = self._agent()
        if isinstance(inputs, LiteralMap):
            inputs = inputs.to_flyte_idl()
        submission = await self._submission(agent, task_template, output_prefix, inputs, task_execution_metadata)
        if self._records is not None:
            # Written before the task is queued, so whenever the task is known its record exists.
            submission.meta.record = record_uri(output_prefix)
            command = TaskCommand.from_args(list(task_template.container.args))
            record = TaskRecord(task_template, output_prefix, None if command.inputs else inputs,
                                task_execution_metadata)
            await asyncio.to_thread(self._records.write, submission.meta.record, record)
        if submission.request is not None:
            await asyncio.wrap_future(agent.call(agent.submit, submission.request))
        else:
            await asyncio.wrap_future(agent.call(functools.partial(
                agent.submit_map, submission.meta.key, *submission.map_args, **submission.map_kwargs)))
        return submission.meta

    async def _submission(self, agent: Reactor, task_template: TaskTemplate, output_prefix: str,
                          inputs: Optional[literals_pb2.LiteralMap], task_execution_metadata: Optional[TaskExecutionMetadata],
                          key: Optional[str] = None) -> _Submission:
        custom = ActorCustom.from_custom(task_template.custom)
        if task_template.container is None:
            raise ValueError(
                f"Actor task {task_template.id.name} has no container target; it must be serialized by "
                "flytekitplugins-actor (which never emits a pod target)."
            )
        command = TaskCommand.from_args(list(task_template.container.args))
        if agent.launcher is not None:
            agent.launcher.check_bundle(command.distribution or "")
            agent.launcher.check(custom.environment)  # a pod the cluster can never run fails here, with the setting
        key = key or _task_key(task_execution_metadata) or uuid.uuid4().hex
        fleet = fleet_config(custom.environment, Placement.of_execution(task_execution_metadata), agent.max_ttl_seconds)
        env = _task_environment(task_template, task_execution_metadata)
        timeout = task_template.metadata.timeout.total_seconds() if task_template.metadata.timeout else 0.0
        name = task_template.id.name or "task"

        def task_run(task_inputs: bytes, prefix: str, element: Optional[int] = None) -> bytes:
            # Serialized: a queued task then costs a third of the memory of a live message.
            return lease_pb2.TaskRun(
                task_name=name,
                resolver=command.resolver,
                resolver_args=command.resolver_args,
                inputs=task_inputs,
                inputs_uri="" if task_inputs else (command.inputs or ""),
                output_prefix=prefix,
                raw_output_data_prefix=command.raw_output_data_prefix or f"{output_prefix.rstrip('/')}/raw",
                checkpoint_path=command.checkpoint_path or "",
                prev_checkpoint=command.prev_checkpoint or "",
                distribution=command.distribution or "",
                dest_dir=command.dest_dir or "",
                env=env,
                timeout_seconds=timeout,
                # Map elements, and every task of an agent that keeps task records: a restarted agent finds the
                # results nobody received in the blob store (the fast path otherwise returns them in-band only).
                outputs_to_prefix=element is not None or self._records is not None,
                # A map's elements may run one after another in one executor session (lease.proto, TaskRun), and
                # those that finish together have their outputs stored in one file (element_groups.py).
                batch_key=key if element is not None else "",
                outputs_group_prefix=element_groups.folder(output_prefix) if element is not None else "",
                element_index=element or 0,
            ).SerializeToString()

        if custom.map is None:
            task_inputs = b""
            if inputs is not None and inputs.ByteSize() > INLINE_INPUT_BYTES:
                # Never on the lease stream: the replica reads them from the blob store (propeller wrote them to
                # the rendered --inputs path already; serializing 100 MB again would cost seconds).
                if not command.inputs:
                    command.inputs = f"{output_prefix.rstrip('/')}/actor-inputs.pb"
                    await asyncio.to_thread(blob.write, command.inputs, inputs.SerializeToString())
            elif inputs is not None:
                task_inputs = inputs.SerializeToString()
            request = core.TaskRequest(
                key=key,
                fleet=fleet,
                payload=task_run(task_inputs, output_prefix),
                timeout_seconds=timeout,
                name=name,
            )
            return _Submission(ActorMetadata(key=key), output_prefix, request=request)

        prefix = output_prefix.rstrip("/")
        interface_inputs = {k: v.type for k, v in (task_template.interface.inputs or {}).items()}
        elements = await asyncio.to_thread(
            MapElements.prepare, inputs, command.inputs, custom.map.mapped_inputs, custom.map.bound_inputs, prefix,
            interface_inputs)
        attempt = task_execution_metadata.task_execution_id.retry_attempt if _task_key(task_execution_metadata) else 0
        recovered: Dict[int, str] = {}
        if attempt:
            try:
                recovered = await asyncio.wait_for(
                    asyncio.to_thread(blob.recover_elements, prefix, attempt, elements.size), RECOVERY_SCAN_SECONDS)
            except asyncio.TimeoutError:
                log.warning("actor map %s: listing earlier attempts took over %ss; every element runs again", key,
                            RECOVERY_SCAN_SECONDS)
        if recovered:
            log.info("actor map %s: %d of %d elements recovered from earlier attempts", key, len(recovered),
                     elements.size)
            self._recovered[key] = recovered
        retries = task_template.metadata.retries.retries if task_template.metadata.retries else 0

        def make_element(index: int) -> core.TaskRequest:
            return core.TaskRequest(
                key=core.element_key(key, index),
                fleet=fleet,
                payload=task_run(elements.inputs(index), f"{prefix}/{index}", element=index),
                timeout_seconds=timeout,
                name=f"{name}[{index}]",
            )

        outputs = list((task_template.interface.outputs or {}).keys())
        meta = ActorMetadata(key=key, map_outputs=",".join(outputs), optional_outputs=custom.map.optional,
                             output_prefix=prefix)
        return _Submission(meta, prefix, map_args=(
            fleet, elements.size, make_element, custom.map.concurrency, custom.map.min_success_ratio), map_kwargs=dict(
            retries=retries, min_successes=custom.map.min_successes, recovered=set(recovered)))

    async def get(self, resource_meta: ActorMetadata, wait: Optional[float] = ASSEMBLY_WAIT_SECONDS,
                  **kwargs) -> Resource:
        """The task's state; a map that succeeded is reported SUCCEEDED once its outputs.pb is written (within
        ``wait`` seconds, else RUNNING until a later call; None: wait until it is)."""
        agent = self._agent()
        view: Optional[TaskView] = agent.final_view(resource_meta.key)
        if view is None:
            view = await asyncio.wrap_future(agent.call(agent.known_view, resource_meta.key))
        if view is None:
            if resource_meta.problem:
                return Resource(phase=TaskExecution.FAILED, message=resource_meta.problem)
            if resource_meta.record and self._records is not None:
                problem = await self._rebuild(agent, resource_meta)
                if problem:
                    return Resource(phase=TaskExecution.RETRYABLE_FAILED, message=problem)
            view = await asyncio.wrap_future(agent.call(agent.view, resource_meta.key))
        if view is None:
            self._published.pop(resource_meta.key, None)
            self._recovered.pop(resource_meta.key, None)
        if view is None or not view.size or not view.phase.terminal or not resource_meta.output_prefix:
            resource = resource_of(view, resource_meta)
            if view is not None and view.phase is core.Phase.RUNNING:
                # Propeller forwards only the first answer of a phase: the links must be on the first RUNNING one.
                resource.log_links = logs.task_logs(self.log_config, view.placement, view.key, view.started_at,
                                                    time.time())
            return resource
        if resource_meta.key not in self._published:
            self._forget_published()
            self._published[resource_meta.key] = (time.monotonic(), self._writer.submit(
                self._publish, view, resource_meta, self._recovered.get(resource_meta.key, {})))
        published = self._published[resource_meta.key][1]
        try:
            raw = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(published)), timeout=wait)
        except asyncio.TimeoutError:
            return Resource(phase=TaskExecution.RUNNING, message=(
                f"all {view.size} elements finished; writing the map's outputs to {resource_meta.output_prefix}"))
        except Exception as e:  # noqa: BLE001 - the blob store refused: propeller may retry the attempt
            self._published.pop(resource_meta.key, None)
            return Resource(phase=TaskExecution.RETRYABLE_FAILED, message=(
                f"The actor map's elements finished, but writing its outputs to {resource_meta.output_prefix} "
                f"failed: {e}"))
        self._recovered.pop(resource_meta.key, None)  # outputs.pb holds what was needed of them
        inline = None if raw is None else LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(raw))
        return resource_of(view, resource_meta, map_result=inline)

    def _forget_published(self) -> None:
        """Drop what is kept of maps finished long ago (propeller stops asking once it saw a terminal phase)."""
        cutoff = time.monotonic() - core.RETAIN_SECONDS
        for key in [k for k, (at, done) in self._published.items() if at < cutoff and done.done()]:
            del self._published[key]

    @staticmethod
    def _publish(view: TaskView, meta: ActorMetadata, recovered: Dict[int, str]) -> Optional[bytes]:
        """Runs in a thread: write the map's outputs.pb (if it succeeded) and its progress page."""
        try:
            blob.write(f"{meta.output_prefix}/progress.html", blob.progress_html(
                meta.key, view.size, view.succeeded, view.failed, view.retried, len(recovered), view.errors,
                view.message).encode())
        except Exception as e:  # noqa: BLE001 - a page for people; never fail the map for it
            log.warning("actor map %s: cannot write progress.html: %s", meta.key, e)
        if view.phase is not core.Phase.SUCCEEDED:
            return None
        names = meta.map_outputs.split(",") if meta.map_outputs else []
        return blob.publish_map_outputs(names, view.element_outputs, meta.output_prefix, recovered)

    async def _rebuild(self, agent: Reactor, meta: ActorMetadata) -> str:
        """Rebuild a task this agent does not know from its record, and hand it to the agent (recovery.py).
        Returns what went wrong, or "" once the agent has it."""
        try:
            record = await asyncio.to_thread(self._records.read, meta.record)
        except FileNotFoundError as e:
            return f"The actor agent does not know task {meta.key} and cannot rebuild it: {e}. Retrying runs it again."
        submission = await self._submission(agent, record.template, record.output_prefix, record.inputs,
                                            record.metadata, key=meta.key)
        if submission.request is not None:
            stored = await asyncio.to_thread(self._records.stored_outputs, submission.output_prefix)
            await asyncio.wrap_future(agent.call(agent.resume, submission.request, stored))
        else:
            size = submission.map_args[1]
            done = await asyncio.to_thread(self._records.done_elements, submission.output_prefix, size)
            if done:  # where their outputs are, for when the map's outputs are assembled
                self._recovered[meta.key] = {**done, **self._recovered.get(meta.key, {})}
            await asyncio.wrap_future(agent.call(functools.partial(
                agent.resume_map, meta.key, *submission.map_args, done=set(done), **submission.map_kwargs)))
        return ""

    async def delete(self, resource_meta: ActorMetadata, **kwargs) -> None:
        """Cancel the task; one this agent does not know is remembered as aborted (``Reactor.cancel``), not
        rebuilt only to be stopped."""
        if not resource_meta.key:
            return  # a meta that does not parse names no task
        agent = self._agent()
        await asyncio.wrap_future(agent.call(agent.cancel, resource_meta.key, "aborted by Flyte (DeleteTask)"))


def resource_of(view: Optional[TaskView], meta: ActorMetadata, map_result: Optional[LiteralMap] = None) -> Resource:
    """The Resource for ``view``. Outputs go inline only when small; ``None`` outputs on SUCCEEDED tell propeller
    to read outputs.pb from the output prefix (flyteplugins ``webapi/agent`` ``writeOutput``)."""
    if view is None:
        return Resource(
            phase=TaskExecution.RETRYABLE_FAILED,
            message=f"The actor agent does not know task {meta.key}: it restarted or forgot the result. Retrying "
            "runs the task again.",
        )
    phase = _PHASES[view.phase]
    message = view.message
    custom_info = None
    if view.size:
        # Propeller sends custom_info with the first event of a phase only (see docs/architecture.md): the
        # element count and where the progress page will be are what stays true.
        custom_info = {"elements": view.size, "succeeded": view.succeeded, "failed": view.failed,
                       "retries": view.retried}
        if meta.output_prefix:
            custom_info["progress"] = f"{meta.output_prefix}/progress.html"
        if not view.phase.terminal:
            message = (f"{view.succeeded + view.failed} of {view.size} elements done ({view.failed} failed, "
                       f"{view.retried} retried)")
    if view.waiting_for_replicas:
        phase = TaskExecution.WAITING_FOR_RESOURCES
    outputs = None
    if view.phase is core.Phase.SUCCEEDED:
        if view.size or meta.map_outputs:
            if map_result is not None:
                outputs = map_result
            elif not view.size:  # no elements: empty lists
                outputs = gather_map_outputs(meta.map_outputs.split(",") if meta.map_outputs else [], [])
        elif isinstance(view.outputs, bytes) and view.outputs:
            outputs = LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(view.outputs))
        elif view.outputs != core.IN_PREFIX:
            outputs = LiteralMap(literals={})
    return Resource(phase=phase, message=message, outputs=outputs, custom_info=custom_info)


class MapElements:
    """Cuts an actor map's inputs into per-element input maps, lazily (a map can have many elements). Holds the
    inputs as one protobuf message; large literals in it are offloaded to the blob store first (:meth:`prepare`),
    so no element's inputs are large."""

    def __init__(self, inputs: literals_pb2.LiteralMap, mapped: List[str], bound: List[str]):
        missing = [n for n in mapped + bound if n not in inputs.literals]
        if missing:
            raise ValueError(f"actor map inputs lack {missing}; got {sorted(inputs.literals)}")
        lengths = {n: len(inputs.literals[n].collection.literals) for n in mapped}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"actor map: mapped inputs must be lists of one length, got lengths {lengths}")
        self.size = next(iter(lengths.values()), 0)
        self._inputs = inputs
        self._mapped = mapped
        self._bound = bound

    @classmethod
    def prepare(cls, inputs: Optional[literals_pb2.LiteralMap], inputs_uri: Optional[str], mapped: List[str],
                bound: List[str], prefix: str, types: Dict[str, object]) -> "MapElements":
        """Runs in a thread (blob I/O): read the inputs if CreateTask did not carry them, load mapped lists that
        were offloaded, and offload bound inputs and list elements over ``OFFLOAD_LITERAL_BYTES``."""
        proto = inputs if inputs is not None else literals_pb2.LiteralMap.FromString(blob.read(_inputs_uri(inputs_uri)))
        for name in mapped:
            literal = proto.literals[name] if name in proto.literals else None
            if literal is not None and literal.HasField("offloaded_metadata"):
                proto.literals[name].CopyFrom(literals_pb2.Literal.FromString(blob.read(literal.offloaded_metadata.uri)))
        for name in bound:
            if name in proto.literals and proto.literals[name].ByteSize() > OFFLOAD_LITERAL_BYTES:
                _offload(proto.literals[name], f"{prefix}/inputs/{name}.pb", types.get(name))
        for name in mapped:
            if name in proto.literals and proto.literals[name].ByteSize() > OFFLOAD_LITERAL_BYTES:
                items = proto.literals[name].collection.literals
                item_type = getattr(types.get(name), "collection_type", None)
                for i, item in enumerate(items):
                    if item.ByteSize() > OFFLOAD_LITERAL_BYTES:
                        _offload(item, f"{prefix}/inputs/{name}/{i}.pb", item_type)
        return cls(proto, mapped, bound)

    def inputs(self, index: int) -> bytes:
        element = literals_pb2.LiteralMap()
        for name in self._mapped:
            element.literals[name].CopyFrom(self._inputs.literals[name].collection.literals[index])
        for name in self._bound:
            element.literals[name].CopyFrom(self._inputs.literals[name])
        return element.SerializeToString()


def _offload(literal: literals_pb2.Literal, uri: str, literal_type) -> None:
    """Write ``literal`` to ``uri`` and turn it, in place, into a flytekit offloaded literal pointing there."""
    data = literal.SerializeToString()
    blob.write(uri, data)
    offloaded = literals_pb2.Literal(offloaded_metadata=literals_pb2.LiteralOffloadedMetadata(
        uri=uri, size_bytes=len(data)))
    if literal_type is not None:
        offloaded.offloaded_metadata.inferred_type.CopyFrom(literal_type.to_flyte_idl())
    literal.Clear()
    literal.CopyFrom(offloaded)


def gather_map_outputs(names: List[str], element_outputs: List[Optional[bytes]]) -> LiteralMap:
    """Collect element outputs in order into one list per output; a failed element gives ``None``."""
    none = Literal(scalar=Scalar(none_type=Void()))
    columns: Dict[str, List[Literal]] = {n: [] for n in names}
    for raw in element_outputs:
        element = LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(raw)) if raw is not None else None
        for name in names:
            columns[name].append(element.literals[name] if element is not None else none)
    return LiteralMap(literals={n: Literal(collection=LiteralCollection(literals=v)) for n, v in columns.items()})


def _task_key(metadata: Optional[TaskExecutionMetadata]) -> Optional[str]:
    task_id = getattr(metadata, "task_execution_id", None)
    exec_id = execution_id(metadata)
    if task_id is None or exec_id is None or not exec_id.name:
        return None
    node = task_id.node_execution_id.node_id
    return f"{exec_id.project}/{exec_id.domain}/{exec_id.name}/{node}/{task_id.retry_attempt}"


def _task_environment(template: TaskTemplate, metadata: Optional[TaskExecutionMetadata]) -> Dict[str, str]:
    """Variables a pod of this task would have that a shared replica does not: the task's own, the execution's,
    and the FLYTE_INTERNAL_* identity flytekit reads to fill in the execution parameters."""
    env = dict(template.container.env or {})
    env.update(getattr(metadata, "environment_variables", None) or {})
    exec_id = execution_id(metadata)
    if exec_id is not None and exec_id.name:
        env.update(
            FLYTE_INTERNAL_EXECUTION_PROJECT=exec_id.project,
            FLYTE_INTERNAL_EXECUTION_DOMAIN=exec_id.domain,
            FLYTE_INTERNAL_EXECUTION_ID=exec_id.name,
            FLYTE_ATTEMPT_NUMBER=str(metadata.task_execution_id.retry_attempt),
        )
    if template.id is not None:
        env.update(
            FLYTE_INTERNAL_TASK_PROJECT=template.id.project or "",
            FLYTE_INTERNAL_TASK_DOMAIN=template.id.domain or "",
            FLYTE_INTERNAL_TASK_NAME=template.id.name or "",
            FLYTE_INTERNAL_TASK_VERSION=template.id.version or "",
        )
    return env


def _inputs_uri(uri: Optional[str]) -> str:
    if not uri:
        raise ValueError("actor map: CreateTask carried no inputs and the container args name no inputs file")
    return uri


def register(agent: Callable[[], Reactor], log_config: Optional[LogConfig] = None,
             records: Optional[TaskRecords] = None) -> List[ActorConnector]:
    """Register connectors for both actor task types with flytekit's ConnectorRegistry."""
    from flytekit.extend.backend.base_connector import ConnectorRegistry

    connectors = [ActorConnector(agent, ACTOR_TASK_TYPE, log_config, records),
                  ActorConnector(agent, ACTOR_MAP_TASK_TYPE, log_config, records)]
    for connector in connectors:
        ConnectorRegistry.register(connector, override=True)
    return connectors


__all__ = ["ActorConnector", "ActorMetadata", "register"]
