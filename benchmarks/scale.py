"""Benchmark 9: what one agent sustains, with simulated replicas that speak the lease protocol (no flytekit, tasks
that take no time or a set time): replicas connected, dispatches per second, GetTask latency with 10,000 tasks in
flight, and the agent's memory.

The agent is the real one (reactor, scheduler, gRPC lease service, connector ``get``) in this process; the
simulated replicas live in a second process (so they do not share this one's interpreter), one gRPC channel and
stream each, as replica pods would have: the launcher hands each launch to that process, which opens the
replica's stream, answers every Assignment with a SUCCEEDED TaskStatus after the task's hold time (carried in its
``TaskRun.timeout_seconds``), and sends heartbeats.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue as queue_module
import time
from typing import List

from flyte_actor_agent import scheduler as core
from flyte_actor_agent.connector import ActorConnector, ActorMetadata
from flyte_actor_agent.launchers import Launcher, ReplicaLaunch
from flyte_actor_agent.lease_service import LeaseService
from flyte_actor_agent.reactor import Reactor

from .common import Results, log, percentile, rss_bytes

ENVIRONMENTS = 20


class SimulatedLauncher(Launcher):
    """Launches a replica by telling the simulator process to open its stream."""

    def __init__(self, on_exit, launches):
        super().__init__(on_exit)
        self.launches = launches

    async def launch(self, replica: ReplicaLaunch) -> None:
        self.launches.put((replica.replica_id, replica.token, replica.fleet_key, replica.agent_address))

    async def stop(self, replica_id: str, reason: str) -> None:
        pass  # the lease service sends Drain; the simulated replica ends its stream

    async def close(self) -> None:
        self.launches.put(None)


def simulator(launches) -> None:
    """The simulated replicas' process: one asyncio loop, one channel and lease stream per replica."""
    asyncio.run(_simulate(launches))


async def _simulate(launches) -> None:
    loop = asyncio.get_running_loop()
    replicas = set()
    while True:
        item = await loop.run_in_executor(None, launches.get)
        if item is None:
            break
        task = asyncio.ensure_future(_replica(*item))
        replicas.add(task)
        task.add_done_callback(replicas.discard)
    for task in list(replicas):
        task.cancel()


async def _replica(replica_id: str, token: str, fleet_key: str, address: str) -> None:
    """One replica; like the real worker, it dials again until the agent welcomes it (a machine opening
    thousands of streams at once sees some fail)."""
    import grpc

    while True:
        try:
            await _session(replica_id, token, fleet_key, address)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)


async def _session(replica_id: str, token: str, fleet_key: str, address: str) -> None:
    """One lease stream; raises AioRpcError if it breaks before the Welcome."""
    import grpc

    from flytekitplugins.actor.protocol import PROTOCOL_VERSION, lease_pb2, lease_pb2_grpc

    outbox: asyncio.Queue = asyncio.Queue()
    running = {}

    async def finish(lease_id: str, hold: float) -> None:
        if hold:
            await asyncio.sleep(hold)
        running.pop(lease_id, None)
        await outbox.put(lease_pb2.ReplicaMessage(status=lease_pb2.TaskStatus(
            lease_id=lease_id, phase=lease_pb2.SUCCEEDED, outputs=b"")))

    async def write(call) -> None:
        while True:
            await call.write(await outbox.get())

    async def beat(interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await outbox.put(lease_pb2.ReplicaMessage(heartbeat=lease_pb2.Heartbeat(running_lease_ids=list(running))))

    async def cancelled(lease_id: str) -> None:
        held = running.pop(lease_id, None)
        if held is not None:
            held.cancel()
            await outbox.put(lease_pb2.ReplicaMessage(status=lease_pb2.TaskStatus(
                lease_id=lease_id, phase=lease_pb2.CANCELLED)))

    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = lease_pb2_grpc.LeaseServiceStub(channel).Connect()
        await call.write(lease_pb2.ReplicaMessage(hello=lease_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, environment_key=fleet_key, replica_id=replica_id, token=token,
            capacity=1)))
        helpers = []
        welcomed = False
        try:
            async for message in call:
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    welcomed = True
                    helpers = [asyncio.ensure_future(write(call)),
                               asyncio.ensure_future(beat(message.welcome.heartbeat_interval_seconds or 5.0))]
                elif kind == "assignment":
                    lease_id = message.assignment.lease_id
                    running[lease_id] = asyncio.ensure_future(finish(lease_id, message.assignment.task.timeout_seconds))
                elif kind == "cancel":
                    await cancelled(message.cancel.lease_id)
                elif kind == "drain":
                    break
        except grpc.aio.AioRpcError:
            if not welcomed:
                raise
        finally:
            for helper in helpers + list(running.values()):
                helper.cancel()


def _fleets(per_fleet: int) -> List[core.FleetConfig]:
    return [core.FleetConfig(key=f"sim-{i}", name=f"sim-{i}", replica_count=per_fleet, ttl_seconds=3600,
                             parallelism=1) for i in range(ENVIRONMENTS)]


def _payload(hold: float) -> bytes:
    from flytekitplugins.actor.protocol import lease_pb2

    return lease_pb2.TaskRun(task_name="sim", timeout_seconds=hold).SerializeToString()


def run(results: Results, quick: bool) -> None:
    replicas = 200 if quick else 2000
    in_flight = 1000 if quick else 10_000
    instant = 2000 if quick else 20_000
    window = 60.0 if quick else 90.0
    bench = "9"
    context = multiprocessing.get_context("spawn")
    launches = context.Queue()
    sim = context.Process(target=simulator, args=(launches,), daemon=True)
    sim.start()
    baseline = rss_bytes()
    agent = Reactor(lambda on_exit: SimulatedLauncher(on_exit, launches), heartbeat_interval=5.0).start(
        lambda reactor: LeaseService(reactor, "127.0.0.1", 0))
    connector = ActorConnector(lambda: agent)
    fleets = _fleets(replicas // ENVIRONMENTS)
    # Held tasks keep every replica busy until they are cancelled, so all replicas connect and stay leased.
    hold = 3600.0
    try:
        log(f"[9] {replicas:,} simulated replicas: submitting {replicas:,} held tasks to start them")
        started = time.monotonic()
        for i in range(replicas):
            request = core.TaskRequest(f"hold-{i}", fleets[i % ENVIRONMENTS], _payload(hold), name="hold")
            agent.call(agent.submit, request).result()
        wait_until(lambda: agent.call(lambda: len(agent.scheduler.leases)).result() >= replicas, 600,
                   "every replica to connect and take a task")
        connected = time.monotonic() - started
        ready = agent.call(lambda: sum(1 for r in agent.scheduler.replicas.values()
                                       if r.state is core.ReplicaState.READY)).result()
        results.add(bench, f"simulated replicas connected to one agent, {ENVIRONMENTS} environments", f"{ready:,}",
                    f"all connected and leased in {connected:.1f} s")

        log(f"[9] queueing {in_flight - replicas:,} more: {in_flight:,} tasks in flight")
        for i in range(in_flight - replicas):
            request = core.TaskRequest(f"queued-{i}", fleets[i % ENVIRONMENTS], _payload(0.0), name="queued")
            agent.call(agent.submit, request).result()
        keys = [f"hold-{i}" for i in range(0, replicas, max(1, replicas // 500))] + [
            f"queued-{i}" for i in range(0, in_flight - replicas, max(1, (in_flight - replicas) // 500))]
        latencies = asyncio.run(_get_latencies(connector, keys))
        results.add(bench, f"GetTask latency, {in_flight:,} tasks in flight, {replicas:,} replicas",
                    f"p50 {percentile(latencies, 50) * 1000:.2f} ms",
                    f"p99 {percentile(latencies, 99) * 1000:.2f} ms, {len(latencies)} calls (connector.get, no gRPC)")
        rss = rss_bytes()
        results.add(bench, "  agent memory (RSS growth of its process)", f"{(rss - baseline) / 2**20:.0f} MiB",
                    f"{(rss - baseline) / in_flight / 1024:.1f} KiB per task in flight, replicas included")

        log("[7] cancelling the held and queued tasks")
        for i in range(replicas):
            agent.call(agent.cancel, f"hold-{i}", "benchmark phase over")
        for i in range(in_flight - replicas):
            agent.call(agent.cancel, f"queued-{i}", "benchmark phase over")
        wait_until(lambda: agent.call(lambda: not any(
            not t.phase.terminal for t in agent.scheduler.tasks.values())).result(), 600, "the queue to empty")
        log(f"[9] {instant:,} instant tasks on {replicas:,} replicas, for {window:g} s at most")
        started = time.monotonic()
        for i in range(instant):
            request = core.TaskRequest(f"instant-{i}", fleets[i % ENVIRONMENTS], _payload(0.0), name="instant")
            agent.call(agent.submit, request)
        wait_until(lambda: finished(agent, "instant-") >= instant or time.monotonic() - started > window,
                   window + 60, "the instant tasks")
        took = time.monotonic() - started
        done = finished(agent, "instant-")
        results.add(bench, f"dispatch rate, instant tasks on {replicas:,} replicas",
                    f"{done / took:,.0f} tasks/s", f"{done:,} of {instant:,} done in {took:.0f} s; submit, lease, "
                    "report, ack on one agent loop")
        sched = agent.scheduler
        timer = agent.call(lambda: _timed(sched.next_deadline)).result()
        results.add(bench, "  scheduler.next_deadline(), O(replicas + leases)", f"{timer * 1000:.1f} ms",
                    "the reactor re-arms its timer with it at most every 50 ms")
        results.data["9"] = {"replicas": ready, "connect_seconds": connected, "get_latencies": latencies,
                             "rss_growth": rss - baseline, "dispatch_rate": done / took, "next_deadline": timer}
    finally:
        agent.stop()
        try:
            launches.put_nowait(None)
        except queue_module.Full:
            pass
        sim.join(timeout=10)
        if sim.is_alive():
            sim.kill()


async def _get_latencies(connector: ActorConnector, keys: List[str]) -> List[float]:
    latencies = []
    for key in keys:
        started = time.perf_counter()
        await connector.get(ActorMetadata(key=key))
        latencies.append(time.perf_counter() - started)
    return latencies


def finished(agent: Reactor, prefix: str) -> int:
    return agent.call(lambda: sum(1 for k, t in agent.scheduler.tasks.items()
                                  if k.startswith(prefix) and t.phase.terminal)).result()


def _timed(fn, runs: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - started) / runs


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
