"""A propeller-like driver for tests: runs a packaged workflow the way flytepropeller would, against an agent
over real gRPC.

It is a test helper, not a mock of the project's code: it speaks flyteidl to whatever serves
``AsyncAgentService`` and ``AgentMetadataService`` at an address, following flyteplugins' ``webapi/agent``
plugin and propeller's node executors as closely as a single process can:

- ``Package.load(dir)`` reads the files of an unpacked ``pyflyte package`` (``*_1.pb`` admin TaskSpec, ``*_2.pb``
  WorkflowSpec, ``*_3.pb`` LaunchPlan) and gives tasks the project, domain and version registration would.
- ``Propeller.run(name, inputs)`` runs a workflow (or launch plan) by name: nodes in dependency order, bindings
  resolved from workflow inputs (``start-node``) and upstream outputs; sub-workflow nodes run inline with
  propeller's unique node ids (``parent-attempt-child``), launch plan nodes as a child execution with the launch
  plan's default and fixed inputs. Nodes run one at a time (propeller would run independent ones in parallel).
- Task nodes whose (type, version) the agent advertises in ``ListAgents`` (asked once) go to the agent:
  inputs.pb is written, container args are rendered (``{{.input}}``, ``{{.outputPrefix}}``,
  ``{{.rawOutputDataPrefix}}``, checkpoints, ``""`` for the previous checkpoint of a first attempt), then
  ``CreateTask`` with propeller's ``TaskExecutionMetadata`` and ``GetTask`` every ``resync_interval`` seconds
  (propeller's default is 30 s) until a terminal phase. ``abort(node_id)`` sends ``DeleteTask``.
- ``python-task`` nodes run as their pod would: a ``pyflyte-execute`` subprocess with the rendered args.
- Anything else is refused, as propeller refuses a task type no plugin handles.

Storage is a local directory laid out as propeller lays out its metadata and raw-data buckets. Tasks run with
retry attempt 0 only: a retryable failure raises instead of being retried.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import grpc
from flyteidl.admin import agent_pb2, launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import identifier_pb2, literals_pb2, tasks_pb2, workflow_pb2 as core_workflow_pb2
from flyteidl.core.errors_pb2 import ErrorDocument
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service.agent_pb2_grpc import AgentMetadataServiceStub, AsyncAgentServiceStub

START_NODE = "start-node"
POD_TASK_TYPES = {"python-task"}
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}
MAX_GET_ERRORS = 5  # propeller fails the attempt after more GetTask errors than this


class TaskFailed(RuntimeError):
    def __init__(self, node_id: str, phase: int, message: str):
        super().__init__(f"node {node_id}: {TaskExecution.Phase.Name(phase)}: {message}")
        self.node_id, self.phase, self.message = node_id, phase, message


@dataclass
class Package:
    tasks: Dict[str, tasks_pb2.TaskTemplate] = field(default_factory=dict)
    workflows: Dict[str, core_workflow_pb2.WorkflowTemplate] = field(default_factory=dict)
    launch_plans: Dict[str, launch_plan_pb2.LaunchPlan] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str, project: str = "flytesnacks", domain: str = "development",
             version: str = "v1") -> "Package":
        package = cls()
        for path in sorted(glob.glob(os.path.join(directory, "*.pb"))):
            with open(path, "rb") as f:
                data = f.read()
            if path.endswith("_1.pb"):
                template = task_pb2.TaskSpec.FromString(data).template
                template.id.project, template.id.domain, template.id.version = project, domain, version
                package.tasks[template.id.name] = template
            elif path.endswith("_2.pb"):
                spec = workflow_pb2.WorkflowSpec.FromString(data)
                for wf in (spec.template, *spec.sub_workflows):
                    package.workflows[wf.id.name] = wf
            elif path.endswith("_3.pb"):
                lp = launch_plan_pb2.LaunchPlan.FromString(data)
                package.launch_plans[lp.id.name] = lp
        return package


@dataclass
class Running:
    category: agent_pb2.TaskCategory
    resource_meta: bytes
    phase: int = TaskExecution.UNDEFINED
    #: The first answer of each phase: the only one propeller turns into a task event (log links included).
    events: Dict[int, agent_pb2.Resource] = field(default_factory=dict)


@dataclass
class Paths:
    """Where propeller puts a node attempt's files: metadata (inputs, outputs) and raw data."""

    input_prefix: str
    output_prefix: str
    raw_output_prefix: str

    @property
    def inputs(self) -> str:
        return f"{self.input_prefix}/inputs.pb"

    @property
    def checkpoint_prefix(self) -> str:
        return f"{self.raw_output_prefix}/_flytecheckpoints"


class Propeller:
    def __init__(self, package: Package, address: str, workdir: str, *, project: str = "flytesnacks",
                 domain: str = "development", namespace: str = "actors", resync_interval: float = 1.0,
                 timeout: float = 300.0, call_timeout: float = 3.0, source_root: Optional[str] = None):
        self.package, self.workdir = package, workdir
        self.project, self.domain, self.namespace = project, domain, namespace
        self.resync_interval, self.timeout, self.call_timeout = resync_interval, timeout, call_timeout
        self.source_root = source_root or os.getcwd()
        self.channel = grpc.insecure_channel(address)
        self.agent = AsyncAgentServiceStub(self.channel)
        self.metadata = AgentMetadataServiceStub(self.channel)
        self.running: Dict[str, Running] = {}  # node id -> the agent task it waits on
        self._categories: Optional[Set[Tuple[str, int]]] = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------------------------------------ routing

    @property
    def agent_categories(self) -> Set[Tuple[str, int]]:
        """(task type, version) pairs the agent advertises, asked once as propeller asks at start."""
        with self._lock:
            if self._categories is None:
                response = self.metadata.ListAgents(agent_pb2.ListAgentsRequest(), timeout=self.call_timeout)
                self._categories = {(c.name, c.version) for a in response.agents for c in a.supported_task_categories}
                self._categories |= {(t, 0) for a in response.agents for t in a.supported_task_types}
            return self._categories

    # --------------------------------------------------------------------------------------- workflows

    def run(self, name: str, inputs: Optional[Dict[str, literals_pb2.Literal]] = None,
            execution: Optional[str] = None) -> literals_pb2.LiteralMap:
        """Run a workflow or launch plan by name; a workflow's default launch plan supplies defaults."""
        lp = self.package.launch_plans.get(name)
        workflow = self.package.workflows[lp.spec.workflow_id.name if lp else name]
        merged = launch_plan_inputs(lp, literals_pb2.LiteralMap(literals=inputs or {}))
        return self._run_workflow(workflow, merged, execution or new_execution_name(), parent="")

    def run_task(self, name: str, inputs: Optional[Dict[str, literals_pb2.Literal]] = None,
                 execution: Optional[str] = None, node_id: str = "n0") -> literals_pb2.LiteralMap:
        """A single-task execution, as `pyflyte run --remote` of a task creates."""
        return self.execute_task(self.package.tasks[name], literals_pb2.LiteralMap(literals=inputs or {}),
                                 execution or new_execution_name(), node_id)

    def _run_workflow(self, workflow: core_workflow_pb2.WorkflowTemplate, inputs: literals_pb2.LiteralMap,
                      execution: str, parent: str) -> literals_pb2.LiteralMap:
        outputs = {START_NODE: inputs}
        for node in in_dependency_order(workflow.nodes):
            node_inputs = literals_pb2.LiteralMap(literals={b.var: resolve(b.binding, outputs) for b in node.inputs})
            unique_id = f"{parent}-0-{node.id}" if parent else node.id  # propeller's GenerateUniqueID, unhashed
            outputs[node.id] = self._run_node(node, node_inputs, execution, unique_id)
        return literals_pb2.LiteralMap(literals={b.var: resolve(b.binding, outputs) for b in workflow.outputs})

    def _run_node(self, node: core_workflow_pb2.Node, inputs: literals_pb2.LiteralMap, execution: str,
                  unique_id: str) -> literals_pb2.LiteralMap:
        target = node.WhichOneof("target")
        if target == "task_node":
            return self.execute_task(self.package.tasks[node.task_node.reference_id.name], inputs, execution,
                                     unique_id)
        if target == "workflow_node" and node.workflow_node.HasField("sub_workflow_ref"):
            workflow = self.package.workflows[node.workflow_node.sub_workflow_ref.name]
            return self._run_workflow(workflow, inputs, execution, parent=unique_id)
        if target == "workflow_node":
            lp = self.package.launch_plans[node.workflow_node.launchplan_ref.name]
            child = f"{execution}-{unique_id}"  # a launch plan node starts a child execution of its own
            return self._run_workflow(self.package.workflows[lp.spec.workflow_id.name],
                                      launch_plan_inputs(lp, inputs), child, parent="")
        raise NotImplementedError(f"node {node.id}: {target} nodes are not supported by this driver")

    # ------------------------------------------------------------------------------------------- tasks

    def execute_task(self, template: tasks_pb2.TaskTemplate, inputs: literals_pb2.LiteralMap, execution: str,
                     node_id: str) -> literals_pb2.LiteralMap:
        request = self.create_task_request(template, inputs, execution, node_id)
        if (template.type, template.task_type_version) in self.agent_categories:
            meta = self.agent.CreateTask(request, timeout=self.call_timeout).resource_meta
            resource = self.wait(template, meta, node_id)
            return self.outputs(template, request.output_prefix, node_id, resource)
        if template.type in POD_TASK_TYPES:
            return self._run_pod(request, node_id)
        raise LookupError(f"node {node_id}: no plugin for task type {template.type!r} (version "
                          f"{template.task_type_version}); the agent advertises {sorted(self.agent_categories)}")

    def create_task_request(self, template: tasks_pb2.TaskTemplate, inputs: literals_pb2.LiteralMap, execution: str,
                            node_id: str, attempt: int = 0) -> agent_pb2.CreateTaskRequest:
        """Write the node's inputs.pb and build the CreateTaskRequest propeller's agent plugin would send."""
        base = f"{self.workdir}/metadata/{self.project}-{self.domain}-{execution}/{node_id}/data"
        paths = Paths(base, f"{base}/{attempt}", f"{self.workdir}/raw/{execution}-{node_id}-{attempt}")
        os.makedirs(paths.output_prefix, exist_ok=True)
        os.makedirs(paths.raw_output_prefix, exist_ok=True)
        with open(paths.inputs, "wb") as f:
            f.write(inputs.SerializeToString())
        rendered = tasks_pb2.TaskTemplate()
        rendered.CopyFrom(template)
        if template.HasField("container"):
            del rendered.container.args[:]
            rendered.container.args.extend(render(template.container.args, paths, self.namespace))
        task_id = identifier_pb2.TaskExecutionIdentifier(
            task_id=template.id,
            node_execution_id=identifier_pb2.NodeExecutionIdentifier(
                node_id=node_id,
                execution_id=identifier_pb2.WorkflowExecutionIdentifier(
                    project=self.project, domain=self.domain, name=execution),
            ),
            retry_attempt=attempt,
        )
        metadata = agent_pb2.TaskExecutionMetadata(task_execution_id=task_id, namespace=self.namespace)
        return agent_pb2.CreateTaskRequest(inputs=inputs, template=rendered, output_prefix=paths.output_prefix,
                                           task_execution_metadata=metadata)

    def wait(self, template: tasks_pb2.TaskTemplate, resource_meta: bytes, node_id: str = "") -> agent_pb2.Resource:
        """GetTask every resync interval until a terminal phase; abort(node_id) may come meanwhile."""
        category = agent_pb2.TaskCategory(name=template.type, version=template.task_type_version)
        running = Running(category, resource_meta)
        with self._lock:
            self.running[node_id] = running
        deadline, errors = time.monotonic() + self.timeout, 0
        try:
            while True:
                time.sleep(self.resync_interval)
                try:
                    resource = self.agent.GetTask(agent_pb2.GetTaskRequest(
                        task_type=category.name, task_category=category, resource_meta=resource_meta),
                        timeout=self.call_timeout).resource
                except grpc.RpcError:
                    errors += 1
                    if errors > MAX_GET_ERRORS:
                        raise
                    continue
                running.phase = resource.phase
                running.events.setdefault(resource.phase, resource)
                if resource.phase == TaskExecution.UNDEFINED:  # propeller falls back to the deprecated state
                    raise TaskFailed(node_id, TaskExecution.RETRYABLE_FAILED, "phase unset: " + resource.message)
                if resource.phase in TERMINAL:
                    return resource
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {node_id}: not done after {self.timeout}s ({resource.message})")
        finally:
            with self._lock:
                self.running.pop(node_id, None)

    def abort(self, node_id: str) -> None:
        with self._lock:
            running = self.running[node_id]
        self.agent.DeleteTask(agent_pb2.DeleteTaskRequest(
            task_type=running.category.name, task_category=running.category, resource_meta=running.resource_meta),
            timeout=self.call_timeout)

    def outputs(self, template: tasks_pb2.TaskTemplate, output_prefix: str, node_id: str,
                resource: agent_pb2.Resource) -> literals_pb2.LiteralMap:
        if resource.phase != TaskExecution.SUCCEEDED:
            raise TaskFailed(node_id, resource.phase, resource.message)
        if not template.interface.outputs.variables:
            return literals_pb2.LiteralMap()  # propeller reads nothing for a task without outputs
        if resource.HasField("outputs"):
            with open(f"{output_prefix}/outputs.pb", "wb") as f:  # propeller writes them itself
                f.write(resource.outputs.SerializeToString())
            return resource.outputs
        return read_outputs(output_prefix, node_id)

    def _run_pod(self, request: agent_pb2.CreateTaskRequest, node_id: str) -> literals_pb2.LiteralMap:
        template, task_id = request.template, request.task_execution_metadata.task_execution_id
        execution = task_id.node_execution_id.execution_id
        env = dict(os.environ, PYTHONPATH=self.source_root, FLYTE_INTERNAL_EXECUTION_ID=execution.name,
                   FLYTE_INTERNAL_EXECUTION_PROJECT=execution.project, FLYTE_INTERNAL_EXECUTION_DOMAIN=execution.domain,
                   FLYTE_INTERNAL_TASK_PROJECT=template.id.project, FLYTE_INTERNAL_TASK_DOMAIN=template.id.domain,
                   FLYTE_INTERNAL_TASK_NAME=template.id.name, FLYTE_INTERNAL_TASK_VERSION=template.id.version,
                   FLYTE_ATTEMPT_NUMBER=str(task_id.retry_attempt))
        env.update({kv.key: kv.value for kv in template.container.env})
        args = list(template.container.args)
        command = [os.path.join(os.path.dirname(sys.executable), args[0]), *args[1:]]
        done = subprocess.run(command, cwd=self.source_root, env=env, capture_output=True, text=True,
                              timeout=self.timeout)
        try:
            return read_outputs(request.output_prefix, node_id)
        except TaskFailed as e:
            if done.returncode:
                e.message += f"\n(exit code {done.returncode}) {done.stderr[-2000:]}"
            raise


# ---------------------------------------------------------------------------------------------- helpers

def new_execution_name() -> str:
    return "a" + uuid.uuid4().hex[:19]  # flyteadmin's names: 20 characters, starting with a letter


def launch_plan_inputs(lp: Optional[launch_plan_pb2.LaunchPlan],
                       inputs: literals_pb2.LiteralMap) -> literals_pb2.LiteralMap:
    """What an execution of the launch plan gets: its defaults, overridden by the inputs, then its fixed inputs."""
    merged = literals_pb2.LiteralMap()
    if lp is not None:
        for name, parameter in lp.spec.default_inputs.parameters.items():
            if parameter.HasField("default"):
                merged.literals[name].CopyFrom(parameter.default)
    for name, literal in inputs.literals.items():
        merged.literals[name].CopyFrom(literal)
    if lp is not None:
        for name, literal in lp.spec.fixed_inputs.literals.items():
            merged.literals[name].CopyFrom(literal)
    return merged


def in_dependency_order(nodes) -> List[core_workflow_pb2.Node]:
    by_id = {n.id: n for n in nodes}
    ordered: List[core_workflow_pb2.Node] = []
    seen: Set[str] = set()

    def visit(node_id: str, path: Tuple[str, ...] = ()) -> None:
        if node_id in seen or node_id not in by_id:  # start-node and "" are workflow inputs
            return
        if node_id in path:
            raise ValueError(f"cycle through {node_id}")
        node = by_id[node_id]
        for upstream in [*node.upstream_node_ids, *(p for b in node.inputs for p in promised_nodes(b.binding))]:
            visit(upstream, path + (node_id,))
        seen.add(node_id)
        ordered.append(node)

    for node in nodes:
        visit(node.id)
    return ordered


def promised_nodes(binding: literals_pb2.BindingData) -> List[str]:
    kind = binding.WhichOneof("value")
    if kind == "promise":
        return [binding.promise.node_id]
    if kind == "collection":
        return [n for b in binding.collection.bindings for n in promised_nodes(b)]
    if kind == "map":
        return [n for b in binding.map.bindings.values() for n in promised_nodes(b)]
    return []


def resolve(binding: literals_pb2.BindingData, outputs: Dict[str, literals_pb2.LiteralMap]) -> literals_pb2.Literal:
    kind = binding.WhichOneof("value")
    if kind == "scalar":
        return literals_pb2.Literal(scalar=binding.scalar)
    if kind == "collection":
        return literals_pb2.Literal(collection=literals_pb2.LiteralCollection(
            literals=[resolve(b, outputs) for b in binding.collection.bindings]))
    if kind == "map":
        return literals_pb2.Literal(map=literals_pb2.LiteralMap(
            literals={k: resolve(b, outputs) for k, b in binding.map.bindings.items()}))
    if kind == "promise":
        if binding.promise.attr_path:
            raise NotImplementedError("promises with an attribute path are not supported by this driver")
        return outputs[binding.promise.node_id or START_NODE].literals[binding.promise.var]
    raise NotImplementedError(f"binding of kind {kind} is not supported by this driver")


_PLACEHOLDERS = [  # (pattern, Paths -> value) in the order template.go applies them
    (r"input", lambda p, ns: p.inputs),
    (r"outputPrefix", lambda p, ns: p.output_prefix),
    (r"inputPrefix", lambda p, ns: p.input_prefix),
    (r"rawOutputDataPrefix", lambda p, ns: p.raw_output_prefix),
    (r"prevCheckpointPrefix", lambda p, ns: '""'),  # no previous attempt: propeller writes two double quotes
    (r"checkpointOutputPrefix", lambda p, ns: p.checkpoint_prefix),
    (r"namespace", lambda p, ns: ns),
]


def render(args, paths: Paths, namespace: str) -> List[str]:
    """Render container args as flyteplugins' template.Render does (case-insensitive, {{.x}} or {{$x}})."""
    rendered = []
    for arg in args:
        for name, value in _PLACEHOLDERS:
            arg = re.sub(r"(?i){{\s*[.$]" + name + r"\s*}}", lambda _m: value(paths, namespace), arg)
        rendered.append(arg)
    return rendered


def read_outputs(output_prefix: str, node_id: str) -> literals_pb2.LiteralMap:
    """Outputs a task wrote itself: outputs.pb, else error.pb, else propeller's OutputsNotFound."""
    if os.path.exists(f"{output_prefix}/outputs.pb"):
        with open(f"{output_prefix}/outputs.pb", "rb") as f:
            return literals_pb2.LiteralMap.FromString(f.read())
    if os.path.exists(f"{output_prefix}/error.pb"):
        with open(f"{output_prefix}/error.pb", "rb") as f:
            error = ErrorDocument.FromString(f.read()).error
        phase = TaskExecution.RETRYABLE_FAILED if error.kind == error.RECOVERABLE else TaskExecution.FAILED
        raise TaskFailed(node_id, phase, f"{error.code}: {error.message}")
    raise TaskFailed(node_id, TaskExecution.RETRYABLE_FAILED, f"OutputsNotFound: no outputs.pb at {output_prefix}")
