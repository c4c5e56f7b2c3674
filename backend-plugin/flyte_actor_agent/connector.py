"""The Flyte connector for actor tasks and actor maps: turns CreateTask/GetTask/DeleteTask into agent calls.

``create`` queues the task and returns at once (propeller gives it a few seconds); it is idempotent for one task
execution id and retry attempt, so a retried CreateTask does not run the task twice. ``get`` answers from the
agent's memory. ``delete`` cancels. Phases map as follows:

=====================================  ================================================================
agent                                  Flyte
=====================================  ================================================================
queued, waiting for replicas           ``QUEUED`` (``WAITING_FOR_RESOURCES`` while no replica is ready)
leased to a replica                    ``RUNNING``
succeeded                              ``SUCCEEDED`` with the outputs
user error                             ``FAILED`` (not retried)
system error, timeout, replica lost    ``RETRYABLE_FAILED`` (retried within the task's retries)
cancelled                              ``ABORTED``
=====================================  ================================================================
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Tuple

from flyteidl.core import literals_pb2
from flytekit import FlyteContextManager
from flytekit.extend.backend.base_connector import AsyncConnectorBase, Resource, ResourceMeta
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit.models.literals import Literal, LiteralCollection, LiteralMap, Scalar, Void
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from flytekitplugins.actor.protocol import lease_pb2
from flytekitplugins.actor.contract import ACTOR_MAP_TASK_TYPE, ACTOR_TASK_TYPE, ActorCustom, TaskCommand

from . import scheduler as core
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


@dataclass
class ActorMetadata(ResourceMeta):
    """What propeller keeps between calls, in etcd, so small whatever the map size: the schema version, the
    task's key in the agent, where CreateTask stored the task's record (``""``: not stored; see recovery.py), and
    what ``get`` needs to shape an actor map's outputs (its output names, comma-separated, and whether failed
    elements become ``None``)."""

    key: str
    map_outputs: str = ""
    optional_outputs: bool = False
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
    #: An actor map's (fleet, size, make_element, concurrency, min_success_ratio).
    map_args: Tuple = ()


class ActorConnector(AsyncConnectorBase):
    """``records``: where CreateTask stores what rebuilds a task after a restart (None: nothing is stored,
    as for local runs, whose agent lives and dies with the run)."""

    name = "Actor Connector"

    def __init__(self, agent: Callable[[], Reactor], task_type_name: str = ACTOR_TASK_TYPE,
                 records: Optional[TaskRecords] = None):
        super().__init__(task_type_name=task_type_name, metadata_type=ActorMetadata)
        self._agent = agent
        self._records = records

    async def create(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        task_execution_metadata: Optional[TaskExecutionMetadata] = None,
        **kwargs,
    ) -> ActorMetadata:
        agent = self._agent()
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
            await asyncio.wrap_future(agent.call(agent.submit_map, submission.meta.key, *submission.map_args))
        return submission.meta

    async def _submission(self, agent: Reactor, task_template: TaskTemplate, output_prefix: str,
                          inputs: Optional[LiteralMap], task_execution_metadata: Optional[TaskExecutionMetadata],
                          key: Optional[str] = None) -> _Submission:
        custom = ActorCustom.from_custom(task_template.custom)
        if task_template.container is None:
            raise ValueError(
                f"Actor task {task_template.id.name} has no container target; it must be serialized by "
                "flytekitplugins-actor (which never emits a pod target)."
            )
        command = TaskCommand.from_args(list(task_template.container.args))
        agent.launcher.check_bundle(command.distribution or "")
        key = key or _task_key(task_execution_metadata) or uuid.uuid4().hex
        fleet = fleet_config(custom.environment, Placement.of_execution(task_execution_metadata), agent.max_ttl_seconds)
        env = _task_environment(task_template, task_execution_metadata)
        timeout = task_template.metadata.timeout.total_seconds() if task_template.metadata.timeout else 0.0
        name = task_template.id.name or "task"

        def task_run(task_inputs: bytes, prefix: str) -> bytes:
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
            ).SerializeToString()

        if custom.map is None:
            request = core.TaskRequest(
                key=key,
                fleet=fleet,
                payload=task_run(inputs.to_flyte_idl().SerializeToString() if inputs else b"", output_prefix),
                timeout_seconds=timeout,
                name=name,
            )
            return _Submission(ActorMetadata(key=key), output_prefix, request=request)

        if inputs is None:
            inputs = await asyncio.to_thread(_read_inputs, command.inputs)
        elements = MapElements(inputs.to_flyte_idl(), custom.map.mapped_inputs, custom.map.bound_inputs)
        prefix = output_prefix.rstrip("/")

        def make_element(index: int) -> core.TaskRequest:
            return core.TaskRequest(
                key=core.element_key(key, index),
                fleet=fleet,
                payload=task_run(elements.inputs(index), f"{prefix}/{index}"),
                timeout_seconds=timeout,
                name=f"{name}[{index}]",
            )

        outputs = list((task_template.interface.outputs or {}).keys())
        meta = ActorMetadata(key=key, map_outputs=",".join(outputs), optional_outputs=custom.map.min_success_ratio < 1)
        return _Submission(meta, prefix, map_args=(
            fleet, elements.size, make_element, custom.map.concurrency, custom.map.min_success_ratio))

    async def get(self, resource_meta: ActorMetadata, **kwargs) -> Resource:
        agent = self._agent()
        view: Optional[TaskView] = await asyncio.wrap_future(agent.call(agent.known_view, resource_meta.key))
        if view is None:
            if resource_meta.problem:
                return Resource(phase=TaskExecution.FAILED, message=resource_meta.problem)
            if resource_meta.record and self._records is not None:
                problem = await self._rebuild(agent, resource_meta)
                if problem:
                    return Resource(phase=TaskExecution.RETRYABLE_FAILED, message=problem)
            view = await asyncio.wrap_future(agent.call(agent.view, resource_meta.key))
        return resource_of(view, resource_meta)

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
            await asyncio.wrap_future(agent.call(agent.resume_map, meta.key, *submission.map_args, done))
        return ""

    async def delete(self, resource_meta: ActorMetadata, **kwargs) -> None:
        """Cancel the task; one this agent does not know is remembered as aborted (``Reactor.cancel``), not
        rebuilt only to be stopped."""
        if not resource_meta.key:
            return  # a meta that does not parse names no task
        agent = self._agent()
        await asyncio.wrap_future(agent.call(agent.cancel, resource_meta.key, "aborted by Flyte (DeleteTask)"))


def resource_of(view: Optional[TaskView], meta: ActorMetadata) -> Resource:
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
        custom_info = {"elements": view.size, "succeeded": view.succeeded, "failed": view.failed}
        if not view.phase.terminal:
            message = f"{view.succeeded + view.failed} of {view.size} elements done ({view.failed} failed)"
    if view.waiting_for_replicas:
        phase = TaskExecution.WAITING_FOR_RESOURCES
    outputs = None
    if view.phase is core.Phase.SUCCEEDED:
        if view.size or meta.map_outputs:
            outputs = gather_map_outputs(meta.map_outputs.split(",") if meta.map_outputs else [], view.element_outputs)
        elif view.outputs:
            outputs = LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(view.outputs))
        else:
            outputs = LiteralMap(literals={})
    return Resource(phase=phase, message=message, outputs=outputs, custom_info=custom_info)


class MapElements:
    """Cuts an actor map's inputs into per-element input maps, lazily (a map can have many elements)."""

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

    def inputs(self, index: int) -> bytes:
        element = literals_pb2.LiteralMap()
        for name in self._mapped:
            element.literals[name].CopyFrom(self._inputs.literals[name].collection.literals[index])
        for name in self._bound:
            element.literals[name].CopyFrom(self._inputs.literals[name])
        return element.SerializeToString()


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


def _read_inputs(uri: Optional[str]) -> LiteralMap:
    if not uri:
        raise ValueError("actor map: CreateTask carried no inputs and the container args name no inputs file")
    ctx = FlyteContextManager.current_context()
    local = ctx.file_access.get_random_local_path()
    ctx.file_access.get_data(uri, local)
    with open(local, "rb") as f:
        return LiteralMap.from_flyte_idl(literals_pb2.LiteralMap.FromString(f.read()))


def register(agent: Callable[[], Reactor], records: Optional[TaskRecords] = None) -> List[ActorConnector]:
    """Register connectors for both actor task types with flytekit's ConnectorRegistry."""
    from flytekit.extend.backend.base_connector import ConnectorRegistry

    connectors = [ActorConnector(agent, ACTOR_TASK_TYPE, records), ActorConnector(agent, ACTOR_MAP_TASK_TYPE, records)]
    for connector in connectors:
        ConnectorRegistry.register(connector, override=True)
    return connectors


__all__ = ["ActorConnector", "ActorMetadata", "register"]
