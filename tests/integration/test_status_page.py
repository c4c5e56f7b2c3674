"""The fleet status page, ``flyte-actor-agent status`` and the metrics port, against a real agent:
``flyte-actor-agent serve --launcher local`` as a process, driven over gRPC as propeller drives it, with two fleets
of real replica processes (one running and queueing tasks after a failure, one running an actor map).

The page is checked in a real browser (headless Chromium: the rendered DOM, and a screenshot); that test alone
skips, with one line, where chromium is not installed (tests/integration/install-chromium.sh installs it). Set
FLYTE_ACTORS_STATUS_SCREENSHOT=docs/status-page.png to keep the screenshot. The Grafana dashboard shipped with the
chart is checked against what the agent's metrics port really serves.
"""

from __future__ import annotations

import functools
import html.parser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service.agent_pb2_grpc import AsyncAgentServiceStub
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from prometheus_client.parser import text_string_to_metric_families

import status_tasks as st
from flytekitplugins.actor import map as actor_map
from flytekitplugins.actor.local import local_template
from harness import stop_served_agent

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DASHBOARD = ROOT / "helm" / "flyte-actor-agent" / "dashboards" / "flyte-actor-agent.json"
AGENT = Path(sys.executable).parent / "flyte-actor-agent"
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _until(condition, what: str, timeout: float = 180, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}" + (f"; agent log:\n{log.read_text()[-3000:]}" if log else ""))


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """A served agent with: fleet status-demo (2 replicas running `hold`, one more queued, an earlier `fails`
    failure) and fleet team.batch (an actor map of 4 elements, 1 done, 2 in flight)."""
    if not AGENT.exists():
        pytest.fail(f"no {AGENT}: install backend-plugin into this environment (make install)")
    tmp = tmp_path_factory.mktemp("status-agent")
    ports = {name: _free_port() for name in ("grpc", "lease", "metrics", "status")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    log_path = tmp / "agent.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(AGENT), "serve", "--launcher", "local", "--host", "127.0.0.1", "--port", str(ports["grpc"]),
         "--lease-port", str(ports["lease"]), "--metrics-port", str(ports["metrics"]),
         "--status-port", str(ports["status"]), "--shutdown-grace-seconds", "1"],
        env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    release = tmp / "release"
    url = f"http://127.0.0.1:{ports['status']}"
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    try:
        def healthy():
            assert process.poll() is None, log_path.read_text()
            try:
                return _get(url + "/healthz", timeout=2) == b"ok\n"
            except OSError:
                return False

        _until(healthy, "the status page", log=log_path)
        stub = AsyncAgentServiceStub(channel)
        ctx = FlyteContextManager.current_context()

        def create(task, **inputs):
            template, output_prefix = local_template(task, ctx)
            literals = TypeEngine.dict_to_literal_map(ctx, inputs, task.get_input_types())
            request = agent_pb2.CreateTaskRequest(inputs=literals.to_flyte_idl(), template=template.to_flyte_idl(),
                                                  output_prefix=output_prefix)
            meta = stub.CreateTask(request, timeout=10).resource_meta
            category = agent_pb2.TaskCategory(name=template.type, version=template.task_type_version)
            return lambda: stub.GetTask(agent_pb2.GetTaskRequest(
                task_type=category.name, task_category=category, resource_meta=meta), timeout=10).resource

        failed = create(st.fails, x=1)
        resource = _until(lambda: (r := failed()).phase in TERMINAL and r, "the failing task", log=log_path)
        assert resource.phase == TaskExecution.FAILED, resource.message
        holds = [create(st.hold, release=str(release)) for _ in range(3)]
        held_map = create(actor_map(functools.partial(st.hold_item, release=str(release)), concurrency=2),
                          i=[0, 1, 2, 3], release=str(release))

        def busy():
            data = json.loads(_get(url + "/status.json"))
            fleets = {f["environment"]: f for f in data["fleets"]}
            demo, batch = fleets.get("status-demo"), fleets.get("team.batch")
            ready = demo and [r for r in demo["replicas"] if r["state"] == "ready" and r["running"]]
            return (ready and len(ready) == 2 and demo["queue_depth"] == 1 and batch and batch["maps"]
                    and batch["maps"][0]["succeeded"] == 1 and data)

        data = _until(busy, "both fleets to be busy", log=log_path)
        yield SimpleNamespace(url=url, ports=ports, data=data, tmp=tmp, log=log_path, holds=holds, map=held_map)
        release.touch()
        for get in (*holds, held_map):
            assert _until(lambda: (r := get()).phase in TERMINAL and r, "released tasks").phase \
                == TaskExecution.SUCCEEDED
    finally:
        release.touch()
        channel.close()
        stop_served_agent(process)
        log.close()


def test_the_json_snapshot_lists_fleets_replicas_tasks_queue_and_maps(agent):
    fleets = {f["environment"]: f for f in agent.data["fleets"]}
    demo, batch = fleets["status-demo"], fleets["team.batch"]
    assert demo["replica_count"] == 2 and demo["queue_depth"] == 1 and len(demo["version"]) == 16
    for replica in demo["replicas"]:
        assert re.fullmatch(r"pid \d+", replica["where"])
        assert [t["name"] for t in replica["running"]] == ["status_tasks.hold"]
        assert replica["state_seconds"] >= 0 and replica["idle_seconds"] is None
    failures = [r["last_failure"] for r in demo["replicas"] if r["last_failure"]]
    assert len(failures) == 1 and "<i id='injected'>markup</i>" in failures[0]
    assert sum(r["tasks_run"] for r in demo["replicas"]) == 1
    (progress,) = batch["maps"]
    assert (progress["size"], progress["succeeded"], progress["failed"], progress["in_flight"]) == (4, 1, 0, 2)
    assert progress["name"].startswith("status_tasks.actor_map_hold_item")
    # The map is quick (its first element took no time), so its second in-flight element does not wait in the
    # agent's queue: it is leased to the one replica, which queues it behind the first (lease.proto, queue_depth).
    (replica,) = batch["replicas"]
    assert batch["queue_depth"] == 0 and len(replica["running"]) == 2
    assert (agent.data["tasks_running"], agent.data["maps_running"]) == (4, 1)  # leased: 2 holds, 2 elements


def test_the_cli_prints_tables_and_json(agent):
    result = subprocess.run([str(AGENT), "status", "--url", agent.url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("ENVIRONMENT", "status-demo", "team.batch", "REPLICA", "status_tasks.hold", "ACTOR MAP",
                     "1/4", "ValueError"):
        assert expected in out, (expected, out)
    as_json = subprocess.run([str(AGENT), "status", "--url", agent.url, "--json"], capture_output=True, text=True,
                             timeout=120)
    assert {f["environment"] for f in json.loads(as_json.stdout)["fleets"]} == {"status-demo", "team.batch"}


def test_the_cli_says_in_one_line_when_it_cannot_reach_the_agent():
    url = f"http://127.0.0.1:{_free_port()}"
    result = subprocess.run([str(AGENT), "status", "--url", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = [line for line in result.stderr.splitlines() if "flyte-actor-agent status" in line]
    assert url in line and "--status-port" in line and "Traceback" not in result.stderr


def test_the_page_is_read_only_and_forbids_scripts(agent):
    with urllib.request.urlopen(agent.url + "/") as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(agent.url + "/", data=b"x", method="POST"))
    assert error.value.code == 501
    with pytest.raises(urllib.error.HTTPError) as error:
        _get(agent.url + "/admin")
    assert error.value.code == 404


class _Dom(html.parser.HTMLParser):
    """Sections by environment, with their rows' classes and texts, from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.ids, self.sections, self.progress = set(), {}, []
        self._section, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "section":
            self._section = self.sections.setdefault(attrs.get("data-environment"), {"replicas": [], "text": ""})
        elif tag == "tr" and "data-replica" in attrs:
            self._row = {"cells": []}
            self._section["replicas"].append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = {"class": attrs.get("class", ""), "text": ""}
            self._row["cells"].append(self._cell)
        elif tag == "progress":
            self.progress.append((attrs.get("value"), attrs.get("max")))

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._section is not None:
            self._section["text"] += data


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (tests/integration/install-chromium.sh installs it as root with apt)")
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=180)


def test_a_real_browser_renders_the_fleets_with_every_value_escaped(agent):
    result = _chromium(agent.tmp, "--dump-dom", agent.url + "/")
    assert result.returncode == 0 and "</html>" in result.stdout, result.stderr[-2000:]
    dom = _Dom()
    dom.feed(result.stdout)
    assert {"status-demo", "team.batch"} <= set(dom.sections)
    demo = dom.sections["status-demo"]
    assert len(demo["replicas"]) == 2
    for row in demo["replicas"]:
        state, where, running = row["cells"][1], row["cells"][2], row["cells"][6]
        assert state["class"] == "state-ready" and state["text"] == "ready"
        assert where["text"].startswith("pid ") and "status_tasks.hold" in running["text"]
    # The failure message's markup is text on the page, not an element.
    assert "injected" not in dom.ids
    assert "<i id='injected'>markup</i> is shown as text" in demo["text"]
    assert "1 queued" in demo["text"] and "version " in demo["text"]
    assert ("1", "4") in dom.progress and "1 of 4" in dom.sections["team.batch"]["text"]

    shot = agent.tmp / "status-page.png"
    result = _chromium(agent.tmp, f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars",
                       agent.url + "/")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    keep = os.environ.get("FLYTE_ACTORS_STATUS_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def _exported_names(text: str) -> set:
    """Every series name a scrape can hold: sample names, and the suffixed names of families without samples yet
    (a labelled counter nobody incremented)."""
    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",), "untyped": ("",), "info": ("_info",)}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_metrics_one_series_per_label_set_with_event_and_cause_apart_and_flytekit_connector_metrics(agent):
    text = _get(f"http://127.0.0.1:{agent.ports['metrics']}/metrics").decode()
    seen = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series = (sample.name, tuple(sorted(sample.labels.items())))
            assert series not in seen, f"{series} appears twice"
            seen.add(series)
    depth = {dict(labels)["environment"]: dict(labels) for name, labels in seen if name == "flyte_actor_queue_depth"}
    assert set(depth) == {"status-demo", "team.batch"} and depth["status-demo"]["version"]
    events = [dict(labels) for name, labels in seen if name == "flyte_actor_replica_events_total"]
    assert events and all(set(e) == {"environment", "event", "cause"} and ":" not in e["event"] for e in events)
    assert ("flyte_connector_requests_success_total",
            (("operation", "create"), ("task_type", "actor"))) in seen  # flytekit's, from the default registry
    assert "process_resident_memory_bytes" in {name for name, _ in seen}


def test_every_dashboard_panel_queries_metrics_the_agent_exports(agent):
    exported = _exported_names(_get(f"http://127.0.0.1:{agent.ports['metrics']}/metrics").decode())
    dashboard = json.loads(DASHBOARD.read_text())
    variables = " ".join(v.get("definition", "") for v in dashboard["templating"]["list"])
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:flyte|process)_[a-z0-9_]+)\b", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], sorted(names - exported))
    assert set(re.findall(r"\b(flyte_[a-z0-9_]+)\b", variables)) <= exported


def test_the_agent_says_in_one_line_when_the_status_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(AGENT), "serve", "--launcher", "local", "--host", "127.0.0.1", "--port", str(_free_port()),
             "--lease-port", str(_free_port()), "--metrics-port", "0", "--status-port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"cannot serve the status page on 127.0.0.1:{port}" in result.stderr and "--status-port" in result.stderr
