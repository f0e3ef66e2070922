"""`bench.hops.split`: one sequential call's socket events cut into its four parts."""

from __future__ import annotations

from bench.hops import split

US = 1_000  # ns


def _call(start: int) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    """One call's events: request, confirm (small read), server read/write, reply."""
    client = [
        (start, "w", 300),  # request
        (start + 120 * US, "r", 21),  # its confirm
        (start + 700 * US, "r", 250),  # the reply
    ]
    server = [
        (start + 200 * US, "r", 300),  # the request arrives
        (start + 450 * US, "w", 250),  # the reply is written
        (start + 600 * US, "r", 21),  # its confirm
    ]
    return client, server


def test_split_measures_each_part_of_sequential_calls() -> None:
    """Each call splits into hop, server, hop and client spans; acks and heartbeats are skipped."""
    client: list[tuple[int, str, int]] = []
    server: list[tuple[int, str, int]] = []
    for n in range(5):
        c, s = _call(n * 1_000 * US)
        client += c
        server += s
    client.append((2_500 * US, "w", 8))  # a heartbeat: not a request
    server.append((3_300 * US, "w", 21))  # a held ack written mid-call: not the reply
    client.sort()
    server.sort()
    assert split(client, server) == [200.0, 250.0, 250.0, 300.0]
