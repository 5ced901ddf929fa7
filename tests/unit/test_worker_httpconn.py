"""The keep-alive pool: how many idle connections it keeps, per origin and in all."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from imagebatch_common import httpconn
from imagebatch_common.httpconn import ConnectionPool, PoolKey


@dataclass
class FakeConnection:
    """Stands for an idle connection whose socket shows nothing pending."""

    name: str
    closed: bool = False
    sock: object | None = None

    def close(self) -> None:
        self.closed = True


def key(host: str) -> PoolKey:
    return ("http", host, 80, "192.0.2.1")


def pool_with(per_origin: int, origins: int, monkeypatch: pytest.MonkeyPatch) -> ConnectionPool:
    monkeypatch.setattr(httpconn, "_dropped", lambda connection: connection.closed)
    return ConnectionPool(per_origin, origins)


def test_connections_come_back_last_in_first_out(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_with(2, 4, monkeypatch)
    first, second = FakeConnection("first"), FakeConnection("second")
    pool.give_back(key("a"), first)  # type: ignore[arg-type]
    pool.give_back(key("a"), second)  # type: ignore[arg-type]

    assert id(pool.take(key("a"))) == id(second)
    assert id(pool.take(key("a"))) == id(first)
    assert pool.take(key("a")) is None
    assert pool.take(key("b")) is None


def test_extra_idle_connections_of_an_origin_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_with(1, 4, monkeypatch)
    kept, extra = FakeConnection("kept"), FakeConnection("extra")
    pool.give_back(key("a"), kept)  # type: ignore[arg-type]
    pool.give_back(key("a"), extra)  # type: ignore[arg-type]

    assert (kept.closed, extra.closed) == (False, True)


def test_least_recently_used_origin_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_with(1, 2, monkeypatch)
    a, b, c = FakeConnection("a"), FakeConnection("b"), FakeConnection("c")
    pool.give_back(key("a"), a)  # type: ignore[arg-type]
    pool.give_back(key("b"), b)  # type: ignore[arg-type]
    pool.give_back(key("c"), c)  # type: ignore[arg-type]

    assert (a.closed, b.closed, c.closed) == (True, False, False)


def test_a_dropped_connection_is_closed_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_with(2, 2, monkeypatch)
    dropped = FakeConnection("dropped")
    pool.give_back(key("a"), dropped)  # type: ignore[arg-type]
    dropped.closed = True  # the server went away while it was idle

    assert pool.take(key("a")) is None


def test_close_closes_every_idle_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_with(2, 2, monkeypatch)
    connections = [FakeConnection(str(n)) for n in range(3)]
    for n, connection in enumerate(connections):
        pool.give_back(key(str(n % 2)), connection)  # type: ignore[arg-type]

    pool.close()

    assert all(connection.closed for connection in connections)
