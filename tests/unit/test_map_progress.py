"""What people can see of a running actor map: the agent's metrics gauge, the first RUNNING answer's custom_info,
and the progress page written when it ends."""

from __future__ import annotations

import concurrent.futures

from flyteidl.core.execution_pb2 import TaskExecution
from prometheus_client import generate_latest

from flyte_actor_agent import outputs as blob
from flyte_actor_agent.connector import ActorMetadata, resource_of
from flyte_actor_agent.metrics import Metrics
from flyte_actor_agent.scheduler import Assign, FleetConfig, Launch, Outcome, Scheduler, TaskRequest
from flyte_actor_agent.views import task_view


def run_now(fn, *args):
    future = concurrent.futures.Future()
    future.set_result(fn(*args))
    return future


def started_map():
    sched = Scheduler(clock=lambda: 0.0)
    fleet = FleetConfig(key="env-v1", name="env", replica_count=1, ttl_seconds=60, parallelism=2)
    effects = sched.submit_map("m", fleet, 5, lambda i: TaskRequest(key=f"m/{i}", fleet=fleet, payload=i), retries=1)
    (launch,) = [e for e in effects if isinstance(e, Launch)]
    first, second = [e for e in sched.replica_connected(launch.replica_id, launch.token, fleet.key, 2)
                     if isinstance(e, Assign)]
    sched.report(first.replica_id, first.lease_id, Outcome.SUCCEEDED, outputs=b"")
    sched.report(second.replica_id, second.lease_id, Outcome.FAILED, retryable=True, message="flaky")
    return sched


def test_running_maps_report_their_elements_in_the_metrics():
    metrics = Metrics()
    metrics.watch(started_map(), run_now)
    text = generate_latest(metrics.registry).decode()
    for state, value in (("total", 5), ("succeeded", 1), ("failed", 0), ("retried", 1), ("in_flight", 4)):
        assert f'flyte_actor_map_elements{{environment="env",state="{state}"}} {value}.0' in text


def test_the_running_answer_carries_counts_and_where_the_progress_page_will_be():
    view = task_view(started_map(), "m")
    resource = resource_of(view, ActorMetadata(key="m", output_prefix="s3://b/n0/data/0"))
    assert resource.phase == TaskExecution.RUNNING
    assert resource.custom_info == {"elements": 5, "succeeded": 1, "failed": 0, "retries": 1,
                                    "progress": "s3://b/n0/data/0/progress.html"}
    assert "1 of 5 elements done" in resource.message and "1 retried" in resource.message


def test_the_progress_page_names_counts_and_first_failures_escaped():
    page = blob.progress_html("m", 5, 3, 2, 4, 1, {1: "ValueError: <bad>", 3: "boom"}, "3 of 5 elements succeeded")
    assert "<td>5</td><td>3</td><td>2</td><td>4</td><td>1</td>" in page
    assert "ValueError: &lt;bad&gt;" in page and "boom" in page
