"""Lease ids the agent can recognise as its own, even after a restart.

A lease id is ``<nonce>.<mac>|<task key>``: the task key lets a restarted agent rebuild the task a reconnecting
replica runs (see ``Scheduler._recover_lease``), and the MAC (HMAC-SHA256 over the nonce, the replica id and the
task key, under a key only the agent holds) lets it refuse a claim it never issued, or one issued to another
replica. With the Kubernetes launcher the key lives in a Secret mounted into the agent (``--lease-key-file``),
so the next agent verifies the leases of the one before; without it each agent makes its own.

    >>> ids = LeaseIds(b"k" * 32)
    >>> lease = ids.issue("n1", "replica-a", "proj/dev/exec/n0/0")
    >>> ids.verify("replica-a", lease)
    'proj/dev/exec/n0/0'
    >>> ids.verify("replica-b", lease) is None, ids.verify("replica-a", "n1.00|proj/dev/exec/n0/0") is None
    (True, True)
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

#: Separates the signed nonce from the task key; task keys may contain anything after it.
LEASE_KEY_SEPARATOR = "|"
_MAC_HEX = 32  # 128 bits


class LeaseIds:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError(f"a lease signing key needs at least 16 bytes, got {len(key)}; generate one with "
                             "`head -c 32 /dev/urandom`")
        self._key = key

    def issue(self, nonce: str, replica_id: str, task_key: str) -> str:
        return f"{nonce}.{self._mac(nonce, replica_id, task_key)}{LEASE_KEY_SEPARATOR}{task_key}"

    def verify(self, replica_id: str, lease_id: str) -> Optional[str]:
        """The task key of ``lease_id`` if this agent's key issued it to ``replica_id``, else ``None``."""
        signed, separator, task_key = lease_id.partition(LEASE_KEY_SEPARATOR)
        nonce, _, mac = signed.rpartition(".")
        if not separator or not task_key or not nonce:
            return None
        return task_key if hmac.compare_digest(mac, self._mac(nonce, replica_id, task_key)) else None

    def _mac(self, nonce: str, replica_id: str, task_key: str) -> str:
        message = "\0".join((nonce, replica_id, task_key)).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:_MAC_HEX]
