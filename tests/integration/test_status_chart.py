"""The chart's parts of the status page and the Grafana dashboard: the status port on the agent (not on the
Service), reachable through the NetworkPolicy only from peers listed in networkPolicy.status.from, and the
dashboard ConfigMap (off by default) labelled for the Grafana sidecar, holding the dashboard JSON unchanged.

The dashboard's queries are checked against a running agent's metrics in test_status_page.py.
"""

from __future__ import annotations

import json

from test_helm_chart import BASE, CHART, FULLNAME, NAMESPACE, by_kind, container_env, helm, one, run_helm, template, values_file  # noqa: F401

DASHBOARD_FILE = CHART / "dashboards" / "flyte-actor-agent.json"
SCRAPER = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app": "oncall-browser"}}}]


def _status_rules(docs):
    policy = one(docs, "NetworkPolicy")
    return [r for r in policy["spec"]["ingress"] if any(p["port"] == 9091 for p in r["ports"])]


def test_the_status_port_is_on_the_agent_and_closed_by_the_network_policy_unless_peers_are_listed(helm):
    docs, _ = template(helm, {**BASE, "networkPolicy": {"enabled": True}})
    deployment = one(docs, "Deployment")
    assert container_env(deployment)["FLYTE_ACTOR_STATUS_PORT"]["value"] == "9091"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "status", "containerPort": 9091, "protocol": "TCP"} in container["ports"]
    assert all(p["port"] != 9091 for p in one(docs, "Service")["spec"]["ports"])
    assert _status_rules(docs) == []

    docs, _ = template(helm, {**BASE, "networkPolicy": {"enabled": True, "status": {"from": SCRAPER}}})
    assert _status_rules(docs) == [{"ports": [{"port": 9091, "protocol": "TCP"}], "from": SCRAPER}]


def test_the_status_page_can_be_turned_off_and_moved(helm):
    docs, _ = template(helm, {**BASE, "statusPage": {"enabled": False}, "networkPolicy": {"enabled": True,
                                                                               "status": {"from": SCRAPER}}})
    deployment = one(docs, "Deployment")
    assert container_env(deployment)["FLYTE_ACTOR_STATUS_PORT"]["value"] == "0"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert all(p["name"] != "status" for p in container["ports"]) and _status_rules(docs) == []
    docs, _ = template(helm, {**BASE, "ports": {"grpc": 8000, "lease": 8001, "metrics": 9090, "status": 9200}})
    assert container_env(one(docs, "Deployment"))["FLYTE_ACTOR_STATUS_PORT"]["value"] == "9200"


def test_no_dashboard_by_default(helm):
    docs, _ = template(helm, BASE)
    assert [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")] == []


def test_the_dashboard_configmap_is_labelled_for_the_grafana_sidecar_and_holds_the_dashboard(helm):
    docs, _ = template(helm, {**BASE, "metrics": {"grafanaDashboard": {"enabled": True}}})
    (config_map,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["app.kubernetes.io/name"] == "flyte-actor-agent"
    (content,) = config_map["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD_FILE.read_text())

    docs, _ = template(helm, {**BASE, "metrics": {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring", "labels": {"dashboards": "flyte"},
        "annotations": {"grafana_folder": "Flyte"}}}})
    (config_map,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["dashboards"] == "flyte"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Flyte"}


def test_lint_strict_with_the_dashboard_and_a_status_rule(helm):
    values = {"metrics": {"grafanaDashboard": {"enabled": True}},
              "networkPolicy": {"enabled": True, "status": {"from": SCRAPER}}}
    run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", values_file(helm, values))


def test_the_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job", "environment"}
