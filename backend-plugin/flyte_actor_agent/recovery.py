"""Restart without loss: what CreateTask stores so that an agent that does not know a task (it restarted, or a
standby took over) rebuilds it from propeller's resource meta and the blob store, with no database.

At ``CreateTask`` the connector writes a *task record* next to the task's outputs, at
``<output_prefix>/_actor/task.pb``: a flyteidl ``CreateTaskRequest`` (the TaskTemplate with its custom,
container args and interface, the output prefix, the execution metadata) with the inputs left out when the
container args name the inputs file (propeller wrote it there; a map's inputs can be large). The resource meta
stays small whatever the map size: a schema version, the task key, the record's location, and what ``get`` needs
to shape a map's outputs (see ``ActorMetadata`` in connector.py).

When GetTask names a key the agent does not know, the connector reads the record and rebuilds the task as
CreateTask would have; what already ran is not run again:

- a task whose ``outputs.pb`` is stored at its output prefix finished while no agent listened: it is
  ``SUCCEEDED`` with those outputs;
- a task an adopted replica still runs came back with the replica's lease (the lease id carries the key): it only
  gets its payload back, so a later loss queues it again;
- an actor map's elements whose outputs are stored (in an element group under ``<prefix>/_actor/elements``, or as
  ``<prefix>/<i>/outputs.pb``) are done (:func:`TaskRecords.done_elements`, two listings); elements adopted
  replicas still run join the map as they are; only the rest run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

from flyteidl.admin import agent_pb2
from flyteidl.core import literals_pb2
from flytekit import FlyteContextManager
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

from .outputs import finished_elements

#: Version of the resource meta (and of the record it points to). Version 1 was the meta of agents before task
#: records (a key and map output names, no version field); an agent reads only its own version.
META_VERSION = 2

RECORD_PATH = "_actor/task.pb"
OUTPUTS = "outputs.pb"


def record_uri(output_prefix: str) -> str:
    return f"{output_prefix.rstrip('/')}/{RECORD_PATH}"


@dataclass
class TaskRecord:
    """What CreateTask received, as stored: enough to build the same submission again."""

    template: TaskTemplate
    output_prefix: str
    #: As CreateTask carried them (the protobuf message, or flytekit's model of it), or None.
    inputs: Union[literals_pb2.LiteralMap, LiteralMap, None]
    metadata: Optional[TaskExecutionMetadata]

    def to_bytes(self) -> bytes:
        request = agent_pb2.CreateTaskRequest(template=self.template.to_flyte_idl(), output_prefix=self.output_prefix)
        if self.inputs is not None:
            request.inputs.CopyFrom(self.inputs if isinstance(self.inputs, literals_pb2.LiteralMap)
                                    else self.inputs.to_flyte_idl())
        if self.metadata is not None:
            request.task_execution_metadata.CopyFrom(self.metadata.to_flyte_idl())
        return request.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TaskRecord":
        request = agent_pb2.CreateTaskRequest.FromString(data)
        return cls(
            template=TaskTemplate.from_flyte_idl(request.template),
            output_prefix=request.output_prefix,
            inputs=request.inputs if request.HasField("inputs") else None,
            metadata=(TaskExecutionMetadata.from_flyte_idl(request.task_execution_metadata)
                      if request.HasField("task_execution_metadata") else None),
        )


class TaskRecords:
    """Task records and stored outputs in the blob store, through flytekit's file access (so any store flytekit
    reaches: s3, gs, abfs, local paths). Blocking: call from a worker thread."""

    def write(self, uri: str, record: TaskRecord) -> None:
        fs = self._fs(uri)
        fs.makedirs(uri.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(uri, record.to_bytes())

    def read(self, uri: str) -> TaskRecord:
        try:
            data = self._fs(uri).cat_file(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"the task record {uri} is missing") from None
        return TaskRecord.from_bytes(data)

    def stored_outputs(self, output_prefix: str) -> Optional[bytes]:
        """The ``outputs.pb`` a finished task left at ``output_prefix``, if any."""
        uri = f"{output_prefix.rstrip('/')}/{OUTPUTS}"
        fs = self._fs(uri)
        try:
            return fs.cat_file(uri)
        except FileNotFoundError:
            return None

    @staticmethod
    def done_elements(map_prefix: str, size: int) -> Dict[int, str]:
        """The map's elements that finished, and the file that holds each one's outputs (its element group, or
        ``<map_prefix>/<index>/outputs.pb``); the outputs stay in the blob store until the map's outputs are
        assembled."""
        return {i: uri for i, uri in finished_elements(map_prefix).items() if i < size}

    @staticmethod
    def _fs(uri: str):
        return FlyteContextManager.current_context().file_access.get_filesystem_for_path(uri)


__all__ = ["META_VERSION", "TaskRecord", "TaskRecords", "record_uri"]
