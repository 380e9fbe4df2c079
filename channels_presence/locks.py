"""The lock protocol: who waits for whom while presences change.

Every lock is held until the transaction that took it ends, and every
transaction takes its locks in one order, so no two wait for each other:

1. the lock of every socket, shared (an operator, or a test, can hold off
   every join and leave by taking it exclusive);
2. the locks of single sockets, sorted, all in one statement;
3. the rows of the rooms it changes, sorted by name, all in one statement
   (``SELECT ... FOR UPDATE``, in ``changes``);
4. presence rows, which it only changes in rooms it holds.

A join and a leave of one socket take its socket lock, so that each sees what
the other committed, and socket time orders them. A change set takes its rooms'
rows, so that versions and counts move by exactly one change set at a time. A
prune takes only room rows: it never waits on a socket lock while holding one.
No lock is held while the channel layer is waited for: groups change after
commit, and are checked against the rows after (``broadcast.settle``).

PostgreSQL takes advisory locks; SQLite lets one writer in at a time already
(``BEGIN IMMEDIATE``), and needs none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from django.db import transaction

from .sql import Statement

# The advisory lock that each socket's lock is held under (PostgreSQL).
EVERY_SOCKET = 0x6368616E6E656C73  # "channels"


def lock_sockets(channel_names: Iterable[str]) -> None:
    """Serialize the joins and leaves of these sockets until the transaction ends.

    One statement whatever the number of sockets, taking the locks in sorted
    order: two batches that share sockets queue, and never deadlock.
    """
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return
    statement = sockets_statement(channel_names)
    if statement is not None:
        with connection.cursor() as cursor:
            cursor.execute(*statement)


def sockets_statement(channel_names: Iterable[str]) -> Statement | None:
    """The statement of :func:`lock_sockets` on PostgreSQL; None for no sockets."""
    keys = sorted({socket_key(name) for name in channel_names})
    if not keys:
        return None
    # The shared lock of every socket first, as everywhere (the select list is
    # evaluated left to right); then each socket's, in key order (a volatile
    # function in a select list is evaluated after its ORDER BY).
    return (
        "SELECT pg_advisory_xact_lock_shared(%s), (SELECT count(*) FROM "
        "(SELECT pg_advisory_xact_lock(key) FROM unnest(%s::bigint[]) AS key "
        "ORDER BY key) AS locked)",
        [EVERY_SOCKET, keys],
    )


def socket_key(name: str) -> int:
    """The advisory lock key of a socket: 64 bits of a hash of its name."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
