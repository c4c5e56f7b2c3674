"""The fleet status view: which environments have fleets, their replicas (state, pod or process, current tasks,
since when, tasks run, last failure), queue depth and running actor maps, as JSON and as an HTML page served by
the agent on its own port (``--status-port``), and ``flyte-actor-agent status``, which prints it as tables.

    flyte-actor-agent status --url http://127.0.0.1:9091        # or: kubectl port-forward deploy/... 9091

The snapshot is taken on the reactor's loop (:func:`.views.agent_status`), so it is consistent; the page is read
only, has no scripts and no external assets, and every value on it is escaped (names and messages come from
users' code).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import html
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Sequence

from .views import agent_status

DEFAULT_PORT = 9091
#: How long a request waits for the reactor's snapshot.
SNAPSHOT_TIMEOUT_SECONDS = 5.0


# ----------------------------------------------------------------------------------------------- the snapshot


def snapshot(reactor) -> Dict[str, Any]:
    """The agent's status as plain JSON data (taken on the reactor's loop)."""

    def take():
        launcher = reactor.launcher
        where = launcher.where if launcher is not None else (lambda replica_id: "")
        return agent_status(reactor.scheduler, where)

    status = reactor.call(take).result(timeout=SNAPSHOT_TIMEOUT_SECONDS)
    data = dataclasses.asdict(status)
    data["generated_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return data


# ------------------------------------------------------------------------------------------------ rendering


def duration(seconds: Optional[float]) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``; ``-`` for none."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _first_line(text: Optional[str], limit: int = 160) -> str:
    """The first and last lines of a message (a traceback's last line names the exception), shortened."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = " … ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _running(replica: Dict[str, Any]) -> str:
    return ", ".join(f"{t['name']} ({duration(t['running_seconds'])})" for t in replica["running"]) or "-"


def _fleet_title(fleet: Dict[str, Any]) -> str:
    title = fleet["environment"]
    if fleet["namespace"]:
        title += f" in {fleet['namespace']}"
    return title


def _fleet_facts(fleet: Dict[str, Any]) -> List[str]:
    ready = sum(1 for r in fleet["replicas"] if r["state"] == "ready")
    facts = [
        f"version {fleet['version'] or '-'}",
        f"{ready} of up to {fleet['replica_count']} replicas ready",
        f"parallelism {fleet['parallelism']}",
        f"ttl {duration(fleet['ttl_seconds'])}",
        f"{fleet['queue_depth']} queued",
    ]
    if fleet["superseded"]:
        facts.append("superseded by a newer version")
    return facts


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .2em}
.summary,.facts{color:#57606a;margin:.2em 0 .6em}
table{border-collapse:collapse;margin:.4em 0 1em;min-width:50%}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right}
.state-ready{color:#1a7f37;font-weight:600}.state-starting{color:#9a6700;font-weight:600}
.state-stopping{color:#57606a;font-weight:600}
.failure{color:#cf222e}progress{width:10em}
"""


def render_html(data: Dict[str, Any], refresh_seconds: int = 5) -> str:
    """The status page. Every value goes through :func:`html.escape`."""
    e = lambda value: html.escape(str(value), quote=True)  # noqa: E731
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">',
        "<title>flyte-actors: fleets</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>flyte-actors agent: fleets</h1>",
        f'<p class="summary" id="summary">{e(len(data["fleets"]))} fleets, {e(data["tasks_queued"])} tasks queued, '
        f'{e(data["tasks_running"])} running, {e(data["maps_running"])} actor maps running'
        f'{", draining (taking no new tasks)" if data["draining"] else ""}; taken {e(data["generated_at"])}</p>',
    ]
    if not data["fleets"]:
        out.append("<p>No fleets yet: a fleet starts with the first task of an actor environment.</p>")
    for fleet in data["fleets"]:
        out.append(f'<section class="fleet" data-environment="{e(fleet["environment"])}" '
                   f'data-key="{e(fleet["key"])}">')
        out.append(f"<h2>{e(_fleet_title(fleet))}</h2>")
        out.append(f'<p class="facts">{" · ".join(e(f) for f in _fleet_facts(fleet))}</p>')
        problems = []
        if fleet["start_failures"]:
            problems.append(f"{fleet['start_failures']} replicas failed to start in a row: "
                            f"{_first_line(fleet['last_start_error'])}")
        if fleet["last_replica_failure"]:
            problems.append(f"last replica failure {duration(fleet['last_replica_failure_seconds'])} ago: "
                            f"{_first_line(fleet['last_replica_failure'])}")
        for problem in problems:
            out.append(f'<p class="failure">{e(problem)}</p>')
        if fleet["replicas"]:
            out.append('<table class="replicas"><thead><tr><th>replica</th><th>state</th><th>pod / process</th>'
                       "<th>in state for</th><th>idle for</th><th>tasks run</th><th>running</th><th>last failure</th>"
                       "</tr></thead><tbody>")
            for r in fleet["replicas"]:
                out.append(
                    f'<tr data-replica="{e(r["id"])}"><td>{e(r["id"])}{" (adopted)" if r["adopted"] else ""}</td>'
                    f'<td class="state-{e(r["state"])}">{e(r["state"])}</td><td>{e(r["where"] or "-")}</td>'
                    f'<td class="num">{e(duration(r["state_seconds"]))}</td>'
                    f'<td class="num">{e(duration(r["idle_seconds"]))}</td>'
                    f'<td class="num">{e(r["tasks_run"])}</td><td class="running">{e(_running(r))}</td>'
                    f'<td class="failure" title="{e((r["last_failure"] or "")[:2000])}">'
                    f'{e(_first_line(r["last_failure"]) or "-")}</td></tr>')
            out.append("</tbody></table>")
        else:
            out.append("<p>No replicas (they start with the next task).</p>")
        if fleet["maps"]:
            out.append('<table class="maps"><thead><tr><th>actor map</th><th>task</th><th>progress</th><th>done</th>'
                       "<th>failed</th><th>in flight</th><th>running for</th></tr></thead><tbody>")
            for m in fleet["maps"]:
                done = m["succeeded"] + m["failed"]
                out.append(
                    f'<tr data-map="{e(m["key"])}"><td>{e(m["key"])}</td><td>{e(m["name"])}</td>'
                    f'<td><progress max="{e(m["size"])}" value="{e(done)}"></progress></td>'
                    f'<td class="num">{e(done)} of {e(m["size"])}</td><td class="num">{e(m["failed"])}</td>'
                    f'<td class="num">{e(m["in_flight"])}</td>'
                    f'<td class="num">{e(duration(m["running_seconds"]))}</td></tr>')
            out.append("</tbody></table>")
        out.append("</section>")
    out.append('<p class="summary">JSON: <a href="status.json">status.json</a> · '
               "also <code>flyte-actor-agent status</code></p></body></html>")
    return "\n".join(out)


def _printable(value: Any) -> str:
    """Terminal-safe text: control characters (escape sequences in a task's message) are shown, not obeyed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def _table(headers: Sequence[str], rows: List[Sequence[Any]], indent: str = "") -> List[str]:
    cells = [[_printable(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def render_text(data: Dict[str, Any]) -> str:
    """The status as plain-text tables (what ``flyte-actor-agent status`` prints)."""
    lines = [
        f"{len(data['fleets'])} fleets, {data['tasks_queued']} tasks queued, {data['tasks_running']} running, "
        f"{data['maps_running']} actor maps running{', draining' if data['draining'] else ''} "
        f"(taken {data['generated_at']})",
    ]
    if not data["fleets"]:
        lines.append("No fleets yet: a fleet starts with the first task of an actor environment.")
        return "\n".join(lines)
    lines.append("")
    lines += _table(
        ["ENVIRONMENT", "NAMESPACE", "VERSION", "READY", "MAX", "QUEUED", "MAPS", "NOTE"],
        [[f["environment"], f["namespace"] or "-", f["version"] or "-",
          sum(1 for r in f["replicas"] if r["state"] == "ready"), f["replica_count"], f["queue_depth"],
          len(f["maps"]), "superseded" if f["superseded"] else ""] for f in data["fleets"]])
    for fleet in data["fleets"]:
        lines += ["", f"{_fleet_title(fleet)} ({fleet['version'] or fleet['key']})"]
        if fleet["start_failures"]:
            lines.append(f"  {fleet['start_failures']} failed starts: {_first_line(fleet['last_start_error'])}")
        if fleet["last_replica_failure"]:
            lines.append(f"  last replica failure {duration(fleet['last_replica_failure_seconds'])} ago: "
                         f"{_first_line(fleet['last_replica_failure'])}")
        if fleet["replicas"]:
            lines += _table(
                ["REPLICA", "STATE", "WHERE", "IN STATE", "IDLE", "TASKS RUN", "RUNNING", "LAST FAILURE"],
                [[r["id"] + (" (adopted)" if r["adopted"] else ""), r["state"], r["where"] or "-",
                  duration(r["state_seconds"]), duration(r["idle_seconds"]), r["tasks_run"], _running(r),
                  _first_line(r["last_failure"], 120) or "-"] for r in fleet["replicas"]],
                indent="  ")
        else:
            lines.append("  no replicas")
        if fleet["maps"]:
            lines += _table(
                ["ACTOR MAP", "TASK", "DONE", "FAILED", "IN FLIGHT", "FOR"],
                [[m["key"], m["name"], f"{m['succeeded'] + m['failed']}/{m['size']}", m["failed"], m["in_flight"],
                  duration(m["running_seconds"])] for m in fleet["maps"]],
                indent="  ")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the server


class StatusServer:
    """A read-only HTTP server of ``/`` (HTML), ``/status.json`` and ``/healthz``, in a daemon thread."""

    def __init__(self, take_snapshot: Callable[[], Dict[str, Any]], host: str, port: int):
        handler = type("Handler", (_Handler,), {"take_snapshot": staticmethod(take_snapshot)})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="actor-status", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_status(reactor, host: str, port: int) -> StatusServer:
    return StatusServer(lambda: snapshot(reactor), host, port)


class _Handler(BaseHTTPRequestHandler):
    take_snapshot: Callable[[], Dict[str, Any]]
    server_version = "flyte-actor-agent"

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            return self._send(200, "text/plain; charset=utf-8", b"ok\n")
        if path not in ("/", "/status", "/status.json"):
            return self._send(404, "text/plain; charset=utf-8",
                              f"no page {path!r} here: see / or /status.json\n".encode())
        try:
            data = self.take_snapshot()
        except Exception as e:  # noqa: BLE001 - one line to the client, never a traceback
            return self._send(503, "text/plain; charset=utf-8",
                              f"the agent did not answer in time ({type(e).__name__}); try again\n".encode())
        if path == "/status.json":
            return self._send(200, "application/json", json.dumps(data, indent=1).encode())
        return self._send(200, "text/html; charset=utf-8", render_html(data).encode())

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # No scripts, no frames, nothing fetched from elsewhere: only the page's own inline style.
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - quiet: a refreshing page would fill the agent's log
        pass


# ------------------------------------------------------------------------------------------------------ CLI


def add_status_command(sub) -> None:
    status = sub.add_parser("status", help="print the fleets of a running agent (from its status page)")
    port = os.environ.get("FLYTE_ACTOR_STATUS_PORT") or DEFAULT_PORT
    status.add_argument("--url", default=os.environ.get("FLYTE_ACTOR_STATUS_URL") or f"http://127.0.0.1:{port}",
                        help="the agent's status page [FLYTE_ACTOR_STATUS_URL; default: this host, "
                             "FLYTE_ACTOR_STATUS_PORT or 9091]")
    status.add_argument("--json", action="store_true", help="print the JSON snapshot instead of tables")


def status_command(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = json.load(response)
    except urllib.error.HTTPError as e:
        print(f"flyte-actor-agent status: {url} answered {e.code}: {_first_line(e.read().decode(errors='replace'))}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"flyte-actor-agent status: cannot read {url} ({reason}); is the agent running with --status-port "
              "(in a cluster: kubectl port-forward to it), or pass --url?", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=1) if args.json else render_text(data))
    return 0
