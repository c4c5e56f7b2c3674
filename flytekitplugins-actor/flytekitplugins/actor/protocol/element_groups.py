"""Files that hold the outputs of several actor map elements (``ElementOutputsGroup`` in lease.proto).

An executor that runs a map's elements one after another stores the outputs of those that finish together in one
file under ``TaskRun.outputs_group_prefix`` (the map's ``<prefix>/_actor/elements``), named by the elements'
indices: ``3-9_12.pb`` holds elements 3 to 9 and 12. One listing of that folder then tells which elements are
done, as a listing of ``<prefix>/<i>/outputs.pb`` does for elements stored one by one; a file per group instead
of one per element saves a blob-store request (an S3 PUT) per element, and on a local disk a directory.

The executor writes these files; the agent reads them (its ``outputs`` module). Both import this module,
so both ends agree on the names.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple

from . import lease_pb2

#: Where a map's element groups go, under the map's output prefix.
GROUP_DIR = "_actor/elements"
SUFFIX = ".pb"
#: Longest file name (without the suffix) of a group: a group whose indices do not fit is stored as several.
MAX_NAME_CHARS = 200
_NAME = re.compile(r"\d+(-\d+)?(_\d+(-\d+)?)*")


def folder(map_prefix: str) -> str:
    """Where the element groups of the map with output prefix ``map_prefix`` are."""
    return f"{map_prefix.rstrip('/')}/{GROUP_DIR}"


def name_of(indices: Iterable[int]) -> str:
    """The file name of a group of elements: their indices in order, runs of consecutive ones as ``first-last``,
    joined by ``_``."""
    parts: List[str] = []
    ordered = sorted(set(indices))
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        parts.append(str(ordered[start]) if end == start else f"{ordered[start]}-{ordered[end]}")
        start = end + 1
    return "_".join(parts) + SUFFIX


def indices_of(name: str) -> List[int]:
    """The indices a group file's name lists; ValueError for a name that is not a group's."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
    if not _NAME.fullmatch(stem):
        raise ValueError(f"{name!r} is not the name of an element group file")
    indices: List[int] = []
    for part in stem.split("_"):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise ValueError(f"{name!r} is not the name of an element group file")
        indices.extend(range(lo, hi + 1))
    return indices


def split(elements: Sequence[Tuple[int, bytes]]) -> List[List[Tuple[int, bytes]]]:
    """``(index, outputs)`` pairs cut into groups whose names fit in MAX_NAME_CHARS."""
    groups: List[List[Tuple[int, bytes]]] = []
    runs: List[List[int]] = []  # the current group's runs of consecutive indices, as [first, last]

    def length(runs: List[List[int]]) -> int:
        return sum(len(str(lo)) + (len(str(hi)) + 1 if hi != lo else 0) for lo, hi in runs) + len(runs) - 1

    for element in sorted(elements, key=lambda e: e[0]):
        index = element[0]
        if groups and runs[-1][1] in (index, index - 1):
            extended = runs[:-1] + [[runs[-1][0], index]]
        else:
            extended = runs + [[index, index]]
        if groups and length(extended) <= MAX_NAME_CHARS:
            groups[-1].append(element)
            runs = extended
        else:
            groups.append([element])
            runs = [[index, index]]
    return groups


def pack(elements: Sequence[Tuple[int, bytes]]) -> bytes:
    """The file's bytes: an ElementOutputsGroup of ``(index, serialized LiteralMap)`` pairs."""
    group = lease_pb2.ElementOutputsGroup()
    for index, outputs in elements:
        group.elements.add(index=index, outputs=outputs)
    return group.SerializeToString()


def unpack(data: bytes) -> Dict[int, bytes]:
    """Index -> serialized outputs, from a group file's bytes."""
    return {e.index: e.outputs for e in lease_pb2.ElementOutputsGroup.FromString(data).elements}


__all__ = ["GROUP_DIR", "MAX_NAME_CHARS", "SUFFIX", "folder", "indices_of", "name_of", "pack", "split", "unpack"]
