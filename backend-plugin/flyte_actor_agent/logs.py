"""Log links for actor tasks, templated as Flyte's ``logs`` plugin builds them for task pods.

A port of flyteplugins v1.16.8 ``tasks/logs/logging_utils.go`` (``InitializeLogPlugins``: Kubernetes,
CloudWatch, Stackdriver, then the custom ``templates``) and ``pluginmachinery/tasklog/template.go``
(``{{ .podName }}``-style variables, case-insensitive, ``.`` or ``$``, unset values left as written). The pod
is the replica's, so the links point at the replica running the task. Two variables differ on purpose:
``{{ .podRFC3339StartTime }}``/``{{ .podUnixStartTime }}`` are when the task started on the replica (not when
the long-lived pod was created) and the finish times are when the link was made, so a time-bounded link shows
this task's slice of the replica's log; the replica marks each task's start and end with its key.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from flyteidl.core.execution_pb2 import TaskLog

from .launchers.k8s_config import LogConfig, TemplateLogPlugin


@dataclass(frozen=True)
class TaskIdentity:
    """What the templates may name of the task execution (from the task's key in the agent)."""

    execution_project: str = ""
    execution_domain: str = ""
    execution_name: str = ""
    node_id: str = ""
    retry_attempt: str = ""

    @classmethod
    def from_key(cls, key: str) -> "TaskIdentity":
        parts = key.split("/")
        if len(parts) < 5:
            return cls()
        return cls(*parts[:5])


def plugins(config: LogConfig) -> List[TemplateLogPlugin]:
    """``InitializeLogPlugins``: the enabled built-in links, in propeller's order, then ``templates``."""
    out: List[TemplateLogPlugin] = []
    if config.kubernetes_enabled:
        uri = config.kubernetes_template_uri or (
            f"{config.kubernetes_url}/#!/log/{{{{ .namespace }}}}/{{{{ .podName }}}}/pod?namespace={{{{ .namespace }}}}")
        out.append(TemplateLogPlugin("Kubernetes Logs", [uri]))
    if config.cloudwatch_enabled:
        uri = config.cloudwatch_template_uri or (
            f"https://console.aws.amazon.com/cloudwatch/home?region={config.cloudwatch_region}#logEventViewer:"
            f"group={config.cloudwatch_log_group};stream=var.log.containers.{{{{ .podName }}}}_{{{{ .namespace }}}}_"
            "{{ .containerName }}-{{ .containerId }}.log")
        out.append(TemplateLogPlugin("Cloudwatch Logs", [uri]))
    if config.stackdriver_enabled:
        uri = config.stackdriver_template_uri or (
            f"https://console.cloud.google.com/logs/viewer?project={config.gcp_project}&angularJsUrl=%2Flogs%2F"
            f"viewer%3Fproject%3D{config.gcp_project}&resource={config.stackdriver_logresourcename}&advancedFilter="
            "resource.labels.pod_name%3D{{ .podName }}")
        out.append(TemplateLogPlugin("Stackdriver Logs", [uri]))
    return out + list(config.templates)


def _regex(name: str) -> "re.Pattern[str]":
    # tasklog.MustCreateRegex
    return re.compile(r"(?i){{\s*[\.$]" + name + r"\s*}}")


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def template_vars(placement: Dict[str, Any], task: TaskIdentity, start: float, finish: float) -> List[tuple]:
    """``Input.templateVars``, in Go's order (order matters: ``containerId`` is replaced before ``containerID``
    could shadow it only case-insensitively, as in Go)."""
    container_id = placement.get("container_id", "")
    if "://" in container_id:  # docker://, containerd://: fluentd strips the scheme from stream names
        container_id = container_id.split("://", 1)[1]
    names = [
        ("logName", ""),
        ("podName", placement.get("pod_name", "")),
        ("podUID", placement.get("pod_uid", "")),
        ("namespace", placement.get("namespace", "")),
        ("containerName", placement.get("container_name", "")),
        ("containerID", container_id),
        ("hostname", placement.get("hostname", "")),
        ("nodeName", placement.get("node_name", "")),
        ("nodeID", task.node_id),
        ("taskRetryAttempt", task.retry_attempt),
        ("executionName", task.execution_name),
        ("executionProject", task.execution_project),
        ("executionDomain", task.execution_domain),
        ("podRFC3339StartTime", _rfc3339(start)),
        ("podRFC3339FinishTime", _rfc3339(finish)),
        ("podUnixStartTime", str(int(start))),
        ("podUnixFinishTime", str(int(finish))),
    ]
    return [(_regex(name), value) for name, value in names]


def render(template: str, variables: List[tuple]) -> str:
    """``replaceAll``: each variable with a value replaces its placeholders literally; empty ones stay."""
    for regex, value in variables:
        if value:
            template = regex.sub(lambda _m, v=value: v, template)
    return template


def task_logs(config: LogConfig, placement: Optional[Dict[str, Any]], key: str, started_at: Optional[float],
              now: float) -> List[TaskLog]:
    """The log links of a task running on the replica at ``placement`` (``[]`` when it has no pod)."""
    if not placement:
        return []
    start = started_at if started_at is not None else placement.get("pod_start_time") or now
    variables = template_vars(placement, TaskIdentity.from_key(key), start, now)
    links = []
    for plugin in plugins(config):
        for uri in plugin.template_uris:
            links.append(TaskLog(
                uri=render(uri, variables),
                name=render(plugin.display_name, variables),
                message_format=plugin.message_format,
                ShowWhilePending=plugin.show_while_pending,
                HideOnceFinished=plugin.hide_once_finished,
            ))
    return links
