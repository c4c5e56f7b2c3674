"""What the chaos tests share: the counts every scenario reports, a TCP proxy that can reset or black-hole the
lease streams that go through it (loopback only), and the scan for processes left after a fleet stopped."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

from flyte_actor_agent.local_fleet import wait_until

#: Variable every process of a scenario inherits, so that processes left over can be found in /proc.
RUN_VARIABLE = "FLYTE_CHAOS_RUN"


@dataclass
class Counts:
    """One scenario's outcome. ``lost``: ended without its correct result; ``hung``: not ended in time;
    ``duplicates``: completed more than once on replicas that were not faulted (a re-run after a fault is
    at-least-once delivery, not a duplicate); ``orphans``: processes of the scenario alive after the fleet stopped."""

    scenario: str
    submitted: int = 0
    succeeded: int = 0
    lost: int = 0
    hung: int = 0
    duplicates: int = 0
    orphans: int = 0
    notes: List[str] = field(default_factory=list)

    def row(self) -> str:
        return (f"| {self.scenario} | {self.submitted} | {self.succeeded} | {self.lost} | {self.hung} | "
                f"{self.duplicates} | {self.orphans} |")

    def check(self) -> None:
        print(f"\nchaos counts: {self.row()}" + "".join(f"\n  {n}" for n in self.notes))
        assert (self.lost, self.hung, self.duplicates, self.orphans) == (0, 0, 0, 0), self.row()
        assert self.succeeded == self.submitted, self.row()


def duplicates(log_dir: str, faulted_groups: Iterable[int] = ()) -> int:
    """Elements whose body completed more than once on replicas (process groups) that were not faulted."""
    faulted = {str(g) for g in faulted_groups}
    runs = Counter()
    for name in os.listdir(log_dir):
        element, group = name.split("-")[:2]
        if group not in faulted:
            runs[element] += 1
    return sum(1 for n in runs.values() if n > 1)


class ScenarioProcesses:
    """Marks every process started from here on (they inherit the variable) for the orphan scan."""

    def __init__(self) -> None:
        self.marker = f"{RUN_VARIABLE}={uuid.uuid4().hex}".encode()
        os.environ[RUN_VARIABLE] = self.marker.split(b"=", 1)[1].decode()

    def alive(self) -> List[int]:
        """Live (not zombie) processes carrying this scenario's marker, other than this one."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if self.marker not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            found.append(int(pid))
        return found

    def orphans(self, settle: float = 10.0) -> int:
        """Processes of the scenario still alive once ``settle`` seconds passed (a SIGKILL takes a moment)."""
        deadline = time.monotonic() + settle
        while (alive := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(alive)


class _Link:
    def __init__(self, downstream: socket.socket, upstream: socket.socket):
        self.downstream = downstream  # the replica's side
        self.upstream = upstream  # the agent's side
        self.blackhole = threading.Event()  # drop what the agent sends to the replica

    def reset(self) -> None:
        for sock in (self.downstream, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with RST
                # Wakes the pump thread blocked reading it: a close alone does not, and the kernel then keeps the
                # socket (and the replica's end of the connection) open until data happens to arrive.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the agent's lease port: every replica's stream goes through it."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target: Optional[int] = None
        self.links: List[_Link] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="chaos-proxy").start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                downstream.close()
                continue
            link = _Link(downstream, upstream)
            with self._lock:
                self.links.append(link)
            threading.Thread(target=self._pump, args=(link, downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, downstream, True), daemon=True).start()

    @staticmethod
    def _pump(link: _Link, source: socket.socket, sink: socket.socket, to_replica: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if to_replica and link.blackhole.is_set():
                    continue
                sink.sendall(data)
        except OSError:
            pass
        link.reset()  # one side ended: so does the other

    def live_links(self) -> List[_Link]:
        with self._lock:
            self.links = [l for l in self.links if l.downstream.fileno() != -1]
            return list(self.links)

    def reset_all(self) -> int:
        links = self.live_links()
        for link in links:
            link.reset()
        return len(links)

    def close(self) -> None:
        self._listener.close()
        self.reset_all()


def wait_for(condition, timeout: float, what: str):
    return wait_until(condition, timeout, what, interval=0.05)

