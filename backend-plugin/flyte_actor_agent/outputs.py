"""Task and actor-map data in the execution's blob store, through flytekit's FileAccessProvider (the agent's
credentials for the blob store, as flytekit configures them).

Layout under a map's output prefix ``P`` (propeller gives attempt ``N`` of a node the prefix ``<node data dir>/N``):

=============================  ==================================================================================
``P/_actor/elements/<n>.pb``   the outputs of the elements an executor finished together (an element group,
                               ``flytekitplugins.actor.protocol.element_groups``), named by their indices
                               (``3-9_12.pb``): these elements are done
``P/<i>/outputs.pb``           element ``i``'s outputs, written by flytekit in the replica when they are too large
                               for a group, or by a replica that predates groups: element ``i`` is done too
                               (a failed try leaves ``P/<i>/error.pb`` instead)
``P/inputs/<name>.pb``         a large bound input, offloaded once for all elements (a flytekit offloaded literal)
``P/outputs.pb``               the map's outputs (one list per output), written by the agent when it succeeds
``P/progress.html``            a summary of the elements, written by the agent when the map ends
=============================  ==================================================================================

The map's ``outputs.pb`` is written element by element through a local spool file, so the agent's memory does
not grow with the size of the outputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import html
import os
import re
import tempfile
import threading
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

from flyteidl.core import literals_pb2
from flytekit import FlyteContextManager
from flytekitplugins.actor.protocol import element_groups
from google.protobuf.internal.encoder import _VarintBytes

from .scheduler import IN_PREFIX

OUTPUTS_FILE = "outputs.pb"
#: A map's outputs up to this size are also answered inline in GetTask (propeller's client receives 4 MiB at
#: most); larger ones only through ``outputs.pb``.
INLINE_RESULT_BYTES = 1024 * 1024
#: ... and only when the map has at most this many elements: an answer inline goes through flytekit's models on
#: both sides of the connector (tens of microseconds a literal), and 100,000 literals under 1 MiB took GetTask past
#: propeller's 3 s deadline (benchmark 7). A larger map's outputs are only in ``outputs.pb``.
INLINE_RESULT_ELEMENTS = 10_000
#: Element outputs read from the blob store at once while a map's outputs are assembled.
READ_AHEAD = 16

#: An element's outputs: its bytes, ``scheduler.IN_PREFIX`` (in ``P/<i>/outputs.pb``, or where ``recovered`` says),
#: the URI of the file that holds them (an element group), or None (it failed).
ElementOutputs = Union[bytes, str, None]


def element_prefix(prefix: str, index: int) -> str:
    return f"{prefix.rstrip('/')}/{index}"


def _fs(uri: str):
    return FlyteContextManager.current_context().file_access.get_filesystem_for_path(uri)


def read(uri: str) -> bytes:
    with _fs(uri).open(uri, "rb") as f:
        return f.read()


def write(uri: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="actor-put-") as tmp:
        local = os.path.join(tmp, "data")
        with open(local, "wb") as f:
            f.write(data)
        upload(local, uri)


def upload(local_path: str, uri: str) -> None:
    FlyteContextManager.current_context().file_access.put_data(local_path, uri)


# ----------------------------------------------------------------------------------- finished elements


def finished_elements(prefix: str) -> Dict[int, str]:
    """The elements of the map at ``prefix`` whose outputs are stored, and where: index -> URI of the file that
    holds them (their element group, or their own ``outputs.pb``). Two listings: the prefix, two levels deep, and
    its element groups."""
    fs = _fs(prefix)
    base = fs._strip_protocol(prefix.rstrip("/")).rstrip("/")
    uri_base = prefix.rstrip("/")
    found: Dict[int, str] = {}
    try:
        paths = fs.find(base, maxdepth=2)
    except FileNotFoundError:
        paths = []
    for path in paths:
        match = _ELEMENT_OUTPUTS.fullmatch(path[len(base):]) if path.startswith(base) else None
        if match:
            found[int(match.group(1))] = f"{uri_base}{match.group(0)}"
    try:
        groups = fs.ls(element_groups.folder(base), detail=False)
    except FileNotFoundError:
        groups = []
    for path in groups:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        try:
            indices = element_groups.indices_of(name)
        except ValueError:
            continue  # not a group (a partial write's temporary name, say)
        for index in indices:
            found.setdefault(index, f"{element_groups.folder(uri_base)}/{name}")
    return found


_ELEMENT_OUTPUTS = re.compile(r"/(\d+)/" + re.escape(OUTPUTS_FILE))


def earlier_attempts(output_prefix: str, attempt: int) -> List[str]:
    """Output prefixes of earlier attempts of the same node, newest first. Propeller names attempt ``N``'s
    prefix ``<node data dir>/N`` (flytepropeller ``NodeStatus.OutputDir``); any other layout gives none."""
    root, _, last = output_prefix.rstrip("/").rpartition("/")
    if not root or last != str(attempt):
        return []
    return [f"{root}/{k}" for k in range(attempt - 1, -1, -1)]


def recover_elements(output_prefix: str, attempt: int, size: int) -> Dict[int, str]:
    """Elements an earlier attempt of this map already finished: index -> the file that holds its outputs."""
    recovered: Dict[int, str] = {}
    for prefix in earlier_attempts(output_prefix, attempt):
        for index, uri in finished_elements(prefix).items():
            if index < size:
                recovered.setdefault(index, uri)
    return recovered


# ----------------------------------------------------------------------------------------- map outputs

_NONE = literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void())).SerializeToString()
_LITERALS = literals_pb2.LiteralMap.DESCRIPTOR.fields_by_name["literals"].number
_COLLECTION = literals_pb2.Literal.DESCRIPTOR.fields_by_name["collection"].number
_ITEMS = literals_pb2.LiteralCollection.DESCRIPTOR.fields_by_name["literals"].number


def _tag(field_number: int) -> bytes:
    return _VarintBytes(field_number << 3 | 2)  # wire type 2: length-delimited


def _field(field_number: int, length: int) -> bytes:
    return _tag(field_number) + _VarintBytes(length)


class _ElementReader:
    """Reads one element's outputs from the file that holds them: its own ``outputs.pb``, or an element group,
    which is read once for all its elements (the last GROUPS_KEPT groups are kept)."""

    GROUPS_KEPT = 64

    def __init__(self, reader: Callable[[str], bytes]):
        self.reader = reader
        self.lock = threading.Lock()
        self.groups: "collections.OrderedDict[str, concurrent.futures.Future]" = collections.OrderedDict()

    def __call__(self, uri: str, index: int) -> bytes:
        if f"/{element_groups.GROUP_DIR}/" not in uri:
            return self.reader(uri)
        with self.lock:
            future = self.groups.get(uri)
            mine = future is None
            if mine:
                future = self.groups[uri] = concurrent.futures.Future()
                while len(self.groups) > self.GROUPS_KEPT:
                    self.groups.popitem(last=False)
        if mine:
            try:
                future.set_result(element_groups.unpack(self.reader(uri)))
            except BaseException as e:  # noqa: BLE001 - every waiter sees it
                future.set_exception(e)
        elements = future.result()
        if index not in elements:
            raise ValueError(f"element {index} is not in {uri} (it holds {sorted(elements)[:20]})")
        return elements[index]


def _own_group(uri: str, prefix: str, index: int) -> str:
    """``uri``, a group file a replica reported element ``index``'s outputs stored in (``TaskStatus.outputs_group``),
    if it is one of this map's element groups and lists that element; ValueError naming it otherwise. The agent
    reads it with its own credentials, so a report (from task code that tampered with its executor, say) must not
    make it read anything else."""
    groups = element_groups.folder(prefix) + "/"
    name = uri[len(groups):] if uri.startswith(groups) else ""
    try:
        listed = "/" not in name and index in element_groups.indices_of(name)
    except ValueError:
        listed = False
    if not listed:
        raise ValueError(f"element {index}'s outputs were reported stored in {uri!r}, which is not one of this map's "
                         f"element groups listing it (under {groups})")
    return uri


def element_outputs(
    outputs: List[ElementOutputs], prefix: str, recovered: Dict[int, str], reader: Callable[[str], bytes] = read
) -> Iterator[Optional[bytes]]:
    """Each element's serialized outputs in order (None where it failed), reading those not held in memory from
    the blob store ``READ_AHEAD`` at a time. ``recovered``: index -> the file that holds the outputs of an element
    finished before this agent ran the map (an earlier attempt's, or this one's before a restart)."""
    read_element = _ElementReader(reader)
    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
        pending: List[concurrent.futures.Future] = []

        def fetch(index: int):
            value = outputs[index]
            if isinstance(value, bytes) or value is None:
                return value
            if value == IN_PREFIX:
                uri = recovered.get(index) or f"{element_prefix(prefix, index)}/{OUTPUTS_FILE}"
            else:
                uri = _own_group(value, prefix, index)
            return pool.submit(read_element, uri, index)

        ahead = 0
        for index in range(len(outputs)):
            while ahead < len(outputs) and ahead < index + READ_AHEAD:
                pending.append(fetch(ahead))
                ahead += 1
            item = pending.pop(0)
            yield item.result() if isinstance(item, concurrent.futures.Future) else item


def write_map_outputs(names: List[str], elements: Iterable[Optional[bytes]], target: str) -> int:
    """Write ``LiteralMap{name: Literal(collection=[element outputs[name]...])}`` to the local file ``target``,
    one element at a time (one spool file per output name); a failed element gives a ``None`` literal.
    Returns the size of the file."""
    with tempfile.TemporaryDirectory(prefix="actor-map-") as spool_dir:
        spools = {name: open(os.path.join(spool_dir, str(i)), "wb") for i, name in enumerate(names)}
        try:
            for raw in elements:
                element = literals_pb2.LiteralMap.FromString(raw) if raw is not None else None
                for name, spool in spools.items():
                    if element is None:
                        item = _NONE
                    elif name in element.literals:
                        item = element.literals[name].SerializeToString()
                    else:
                        raise ValueError(f"an element's outputs lack {name!r}; it has {sorted(element.literals)}")
                    spool.write(_field(_ITEMS, len(item)))
                    spool.write(item)
        finally:
            for spool in spools.values():
                spool.close()
        with open(target, "wb") as out:
            for i, name in enumerate(names):
                path = os.path.join(spool_dir, str(i))
                collection = os.path.getsize(path)
                literal = len(_field(_COLLECTION, collection)) + collection
                key = name.encode()
                entry = len(_field(1, len(key))) + len(key) + len(_field(2, literal)) + literal
                out.write(_field(_LITERALS, entry))
                out.write(_field(1, len(key)) + key)
                out.write(_field(2, literal))
                out.write(_field(_COLLECTION, collection))
                with open(path, "rb") as f:
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
            return out.tell()


def publish_map_outputs(
    names: List[str], outputs: List[ElementOutputs], prefix: str, recovered: Dict[int, str]
) -> Optional[bytes]:
    """Assemble an actor map's outputs and write them to ``<prefix>/outputs.pb``; returns them serialized when
    they are small enough to answer inline too, else None."""
    with tempfile.TemporaryDirectory(prefix="actor-map-out-") as tmp:
        local = os.path.join(tmp, OUTPUTS_FILE)
        size = write_map_outputs(names, element_outputs(outputs, prefix, recovered), local)
        upload(local, f"{prefix.rstrip('/')}/{OUTPUTS_FILE}")
        if size <= INLINE_RESULT_BYTES and len(outputs) <= INLINE_RESULT_ELEMENTS:
            with open(local, "rb") as f:
                return f.read()
    return None


def progress_html(name: str, size: int, succeeded: int, failed: int, retried: int, recovered: int,
                  errors: Dict[int, str], message: str) -> str:
    """A small page summarising a finished map (its first failures included), for people."""
    rows = "".join(
        f"<tr><td>{i}</td><td><pre>{html.escape(errors[i][:2000])}</pre></td></tr>" for i in sorted(errors)[:50]
    )
    return (
        f"<html><head><meta charset='utf-8'><title>{html.escape(name)}</title></head><body>"
        f"<h2>Actor map {html.escape(name)}</h2><p>{html.escape(message)}</p>"
        f"<table><tr><th>elements</th><th>succeeded</th><th>failed</th><th>retries</th>"
        f"<th>recovered from earlier attempts</th></tr><tr><td>{size}</td><td>{succeeded}</td><td>{failed}</td>"
        f"<td>{retried}</td><td>{recovered}</td></tr></table>"
        + (f"<h3>Failed elements (first 50)</h3><table>{rows}</table>" if rows else "")
        + "</body></html>"
    )


__all__ = [
    "OUTPUTS_FILE",
    "element_prefix",
    "finished_elements",
    "recover_elements",
    "publish_map_outputs",
    "write_map_outputs",
    "progress_html",
]
