"""Log links (flyte_actor_agent/logs.py), checked against flyteplugins v1.16.8's tasklog and logs test vectors."""

from flyteidl.core.execution_pb2 import TaskLog

from flyte_actor_agent import logs
from flyte_actor_agent.launchers.k8s_config import LogConfig, TemplateLogPlugin

PLACEMENT = {"pod_name": "f-uuid-driver", "pod_uid": "pod-uid", "namespace": "flyteexamples-production",
             "container_name": "spark-kubernetes-driver", "container_id": "cri-o://abc"}


def render(uri, placement=PLACEMENT, key="", start=123, finish=12345):
    return logs.render(uri, logs.template_vars(placement, logs.TaskIdentity.from_key(key), start, finish))


def test_template_vectors():
    # TestTemplateLogPlugin: cloudwatch (containerId with its scheme stripped), stackdriver, kubernetes, splunk
    assert render("https://console.aws.amazon.com/cloudwatch/home?region=us-east-1#logEventViewer:group=/flyte-"
                  "production/kubernetes;stream=var.log.containers.{{.podName}}_{{.namespace}}_{{.containerName}}-"
                  "{{.containerId}}.log") == (
        "https://console.aws.amazon.com/cloudwatch/home?region=us-east-1#logEventViewer:group=/flyte-production/"
        "kubernetes;stream=var.log.containers.f-uuid-driver_flyteexamples-production_spark-kubernetes-driver-abc.log")
    assert render("https://dashboard.k8s.net/#!/log/{{.namespace}}/{{.podName}}/pod?namespace={{.namespace}}",
                  {"pod_name": "flyteexamples-development-task-name", "namespace": "flyteexamples-development"}) == (
        "https://dashboard.k8s.net/#!/log/flyteexamples-development/flyteexamples-development-task-name/pod?"
        "namespace=flyteexamples-development")
    assert render("https://prd-p-ighar.splunkcloud.com/en-US/app/search/search?q=search%20container_name%3D%22"
                  "{{ .containerName }}%22", {"container_name": "my-container"}) == (
        "https://prd-p-ighar.splunkcloud.com/en-US/app/search/search?q=search%20container_name%3D%22my-container%22")


def test_variables_spacing_case_dollar_times_and_execution():
    uri = ("{{ $podUID }}/{{.PODNAME}}/{{ .podUnixStartTime }}-{{ .podUnixFinishTime }}/{{ .podRFC3339StartTime }}/"
           "{{ .executionProject }}/{{ .executionDomain }}/{{ .executionName }}/{{ .nodeID }}/{{ .taskRetryAttempt }}"
           "/{{ .unknown }}")
    assert render(uri, key="p/d/exec1/n0/2", start=60, finish=120) == (
        "pod-uid/f-uuid-driver/60-120/1970-01-01T00:01:00Z/p/d/exec1/n0/2/{{ .unknown }}")


def test_propellers_default_links_and_order():
    # InitializeLogPlugins: kubernetes, cloudwatch, stackdriver (built-in URIs), then templates
    config = LogConfig(kubernetes_enabled=True, kubernetes_template_uri="", kubernetes_url="https://k8s",
                       cloudwatch_enabled=True, cloudwatch_region="us-east-1", cloudwatch_log_group="/g",
                       stackdriver_enabled=True, gcp_project="proj", stackdriver_logresourcename="k8s_container",
                       templates=[TemplateLogPlugin("Grafana", ["https://grafana/{{ .podName }}?from={{ .podUnixStartTime }}"],
                                                    show_while_pending=True)])
    placement = {"pod_name": "env-r1", "namespace": "ns", "container_name": "actor", "pod_uid": "u"}
    links = logs.task_logs(config, placement, "p/d/e/n0/0", started_at=1000.0, now=2000.0)
    assert [link.name for link in links] == ["Kubernetes Logs", "Cloudwatch Logs", "Stackdriver Logs", "Grafana"]
    assert links[0].uri == "https://k8s/#!/log/ns/env-r1/pod?namespace=ns"
    assert links[1].uri.endswith("stream=var.log.containers.env-r1_ns_actor-{{ .containerId }}.log")
    assert links[2].uri.endswith("advancedFilter=resource.labels.pod_name%3Denv-r1")
    assert links[3].uri == "https://grafana/env-r1?from=1000" and links[3].ShowWhilePending
    assert all(link.message_format == TaskLog.JSON for link in links)


def test_no_pod_no_links():
    assert logs.task_logs(LogConfig(), None, "k", None, 1.0) == []
