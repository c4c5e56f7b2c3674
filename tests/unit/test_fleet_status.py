"""Unit tests of the fleet status view (``views.agent_status``), its HTML and text renderings
(``flyte_actor_agent.status``), and the metrics built from scheduler state (one series per fleet; event and cause
as separate labels), driven by the pure scheduler with a fake clock.
"""

from __future__ import annotations

import dataclasses
import html.parser
import itertools
import json
import re

from prometheus_client import generate_latest

from flytekitplugins.actor.contract import SerializedEnvironment

from flyte_actor_agent.metrics import Metrics
from flyte_actor_agent.placement import Placement, fleet_config
from flyte_actor_agent.scheduler import ExitReason, Outcome, ReplicaExit, Scheduler, TaskRequest
from flyte_actor_agent.status import duration, render_html, render_text
from flyte_actor_agent.views import agent_status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def environment(name: str, version: str, replica_count: int = 2) -> SerializedEnvironment:
    return SerializedEnvironment(name=name, version=version, replica_count=replica_count, ttl_seconds=600,
                                 parallelism=1, replica={})


def make_scheduler(clock: Clock) -> Scheduler:
    ids = itertools.count(1)
    return Scheduler(clock=clock, new_id=lambda: f"r{next(ids)}", new_token=lambda: "t")


def launched(effects):
    return [e for e in effects if type(e).__name__ == "Launch"]


def busy_fleet(clock: Clock):
    """A fleet with one replica running a task, one more task queued, a failed task and a crashed replica; an actor
    map on a second fleet."""
    s = make_scheduler(clock)
    fleet = fleet_config(environment("demo", "aaaa"), Placement(namespace="team-a"))
    (launch,) = launched(s.submit(TaskRequest("k1", fleet, "p", name="wf.fails")))
    s.replica_connected(launch.replica_id, "t", fleet.key, capacity=1)
    lease = next(iter(s.replicas[launch.replica_id].leases))
    clock.now += 1
    s.report(launch.replica_id, lease, Outcome.FAILED, message="ValueError: <b>bad</b>\ntraceback...")
    s.submit(TaskRequest("k2", fleet, "p", name="wf.slow"))
    clock.now += 2
    second = launched(s.submit(TaskRequest("k3", fleet, "p", name="wf.waits")))
    (crashed,) = second
    s.replica_gone(crashed.replica_id, ReplicaExit(ExitReason.OOM_KILLED, "container terminated: OOMKilled"))
    maps = fleet_config(environment("team.maps", "bbbb"), Placement())
    s.submit_map("m1", maps, 5, lambda i: TaskRequest(f"m1/{i}", maps, "p", name=f"wf.el[{i}]"), concurrency=2)
    clock.now += 3
    return s, launch.replica_id


def test_the_view_lists_fleets_replicas_running_tasks_queue_and_maps():
    clock = Clock()
    s, replica_id = busy_fleet(clock)
    status = agent_status(s, where=lambda r: f"pid {r[1:]}")
    assert [(f.environment, f.namespace, f.version) for f in status.fleets] == [
        ("demo", "team-a", "aaaa"), ("team.maps", "", "bbbb")]
    demo, maps = status.fleets
    (replica,) = [r for r in demo.replicas if r.id == replica_id]
    assert (replica.state, replica.where, replica.tasks_run, replica.capacity) == ("ready", f"pid {replica_id[1:]}", 1, 1)
    assert [(t.name, t.running_seconds, t.leases) for t in replica.running] == [("wf.slow", 5.0, 1)]
    assert replica.state_seconds == 6.0 and replica.idle_seconds is None
    assert replica.last_failure.startswith("wf.fails: ValueError: <b>bad</b>")
    assert demo.queue_depth == 1 and demo.replica_count == 2
    assert demo.last_replica_failure == "container terminated: OOMKilled" and demo.last_replica_failure_seconds == 3.0
    assert [(m.key, m.name, m.size, m.in_flight, m.succeeded) for m in maps.maps] == [("m1", "wf.el", 5, 2, 0)]
    assert (status.tasks_queued, status.tasks_running, status.maps_running) == (3, 1, 1)
    json.dumps(dataclasses.asdict(status))  # plain data


def test_a_replica_stopped_on_request_is_not_a_failure():
    clock = Clock()
    s = make_scheduler(clock)
    fleet = fleet_config(environment("demo", "aaaa"), Placement())
    (launch,) = launched(s.submit(TaskRequest("k1", fleet, "p")))
    s.stop_replica(launch.replica_id, "idle")
    s.replica_gone(launch.replica_id, ReplicaExit(ExitReason.STOPPED, "stopped: idle"))
    assert agent_status(s).fleets[0].last_replica_failure is None


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def page_data(s: Scheduler):
    data = dataclasses.asdict(agent_status(s))
    data["generated_at"] = "2026-01-01T00:00:00+00:00"
    return data


def test_the_page_escapes_every_value_and_has_no_scripts_or_external_assets():
    clock = Clock()
    s, _ = busy_fleet(clock)
    data = page_data(s)
    data["fleets"][0]["replicas"][0]["where"] = '"><script>alert(1)</script>'
    data["fleets"][0]["key"] = "x\" onmouseover=\"alert(1)"
    page = render_html(data)
    parsed = _Collect()
    parsed.feed(page)
    tags = {tag for tag, _ in parsed.tags}
    assert "script" not in tags and "b" not in tags and "img" not in tags and "link" not in tags
    assert not any("onmouseover" in attrs for _, attrs in parsed.tags)
    assert not any(v and re.match(r"(https?:)?//", v) for _, attrs in parsed.tags for v in attrs.values())
    text = "".join(parsed.text)
    assert "<script>alert(1)</script>" in text and "ValueError: <b>bad</b>" in text  # shown as text
    assert "team.maps" in text and "wf.slow" in text and "OOMKilled" in text


def test_the_text_tables_show_the_same_and_neutralise_terminal_escapes():
    clock = Clock()
    s, replica_id = busy_fleet(clock)
    data = page_data(s)
    data["fleets"][0]["replicas"][0]["running"][0]["name"] = "evil\x1b[2J"
    text = render_text(data)
    assert "\x1b" not in text and "evil\\x1b[2J" in text
    for expected in ("ENVIRONMENT", "demo", "team-a", "team.maps", replica_id, "ready", "0/5", "OOMKilled"):
        assert expected in text, expected
    assert render_text(dict(data, fleets=[])).endswith("No fleets yet: a fleet starts with the first task of an "
                                                       "actor environment.")


def test_durations_read_well():
    assert [duration(s) for s in (None, 0, 59.9, 61, 3600 * 2 + 420, 86400 * 3 + 3600 * 4)] == [
        "-", "0s", "59s", "1m01s", "2h07m", "3d04h"]


def test_queue_depth_is_one_series_per_fleet_and_replica_events_keep_event_and_cause_apart():
    """Three fleets of one environment name (two versions, two namespaces) are three label sets, not three
    samples of one."""
    clock = Clock()
    s = make_scheduler(clock)
    fleets = [fleet_config(environment("demo", v), Placement(namespace=ns))
              for v, ns in (("aaaa", "team-a"), ("bbbb", "team-a"), ("aaaa", "team-b"))]
    for i, fleet in enumerate(fleets):
        s.submit(TaskRequest(f"k{i}", fleet, "p"))
    metrics = Metrics()
    metrics.watch(s, lambda fn: _done(fn()))
    metrics.replica_gone("demo", ExitReason.OOM_KILLED)
    metrics.replica_event("demo", "launched")
    text = generate_latest(metrics.registry).decode()
    depth = [line for line in text.splitlines() if line.startswith("flyte_actor_queue_depth{")]
    assert len(depth) == len(set(line.rsplit(" ", 1)[0] for line in depth)) == 3
    assert 'flyte_actor_queue_depth{environment="demo",namespace="team-b",version="aaaa"} 1.0' in text
    assert 'flyte_actor_replica_events_total{cause="oom_killed",environment="demo",event="gone"} 1.0' in text
    assert 'flyte_actor_replica_events_total{cause="",environment="demo",event="launched"} 1.0' in text
    served = generate_latest(metrics.exported()).decode()
    assert "flyte_actor_queue_depth" in served and "process_cpu_seconds_total" in served


class _done:
    """A finished future holding ``value``."""

    def __init__(self, value):
        self.value = value

    def result(self, timeout=None):
        return self.value


def test_launchers_name_where_a_replica_runs():
    import asyncio

    from kubernetes.client import ApiClient

    from flyte_actor_agent.launchers.kubernetes import KubernetesLauncher
    from flyte_actor_agent.launchers.local import LocalProcessLauncher

    async def launchers():
        return KubernetesLauncher(lambda *_: None, api_client=ApiClient()), LocalProcessLauncher(lambda *_: None)

    pods, processes = asyncio.run(launchers())
    pods.pods["r1"] = ("team-a", "demo-r1")
    assert (pods.where("r1"), pods.where("r2")) == ("pod team-a/demo-r1", "")
    assert processes.where("r1") == ""
    asyncio.run(processes.close())
