"""Unit tests of `service._protocol.vocabulary`: the words agree with docs/protocol.md, the
metrics' label sets come from the enums."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service._observe import metrics
from service._protocol import vocabulary as v

__all__: list[str] = []

PROTOCOL = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()


def _section(number: int) -> str:
    return PROTOCOL.split(f"\n## {number}. ")[1].split("\n## ")[0]


def _first_column(text: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


def test_dead_reasons_are_the_reasons_of_the_protocol() -> None:
    """DeadReason is exactly the reason table of docs/protocol.md §8."""
    assert _first_column(_section(8)) == set(v.DeadReason)


# Headers the vocabulary names that §3 does not list: the broker's own (it writes them, Burrow
# only strips or reads them elsewhere) and the shim's internal marker.
BROKERS_OWN = {
    v.H_DELIVERY_COUNT,
    v.H_FIRST_DEATH_QUEUE,
    v.H_FIRST_DEATH_REASON,
    v.H_FIRST_DEATH_EXCHANGE,
    v.H_LAST_DEATH_QUEUE,
    v.H_LAST_DEATH_REASON,
    v.H_LAST_DEATH_EXCHANGE,
    v.H_ACQUIRED_COUNT,
}
INTERNAL = {v.H_UNDECODABLE}


def test_the_headers_of_the_protocol_are_the_vocabularys() -> None:
    """The header tables of docs/protocol.md §3 name exactly the vocabulary's headers (every
    `H_*` of service/_protocol/vocabulary.py but the broker's own and the internal marker)."""
    ours = {
        value for name, value in vars(v).items() if name.startswith("H_") and isinstance(value, str)
    }
    assert ours >= BROKERS_OWN | INTERNAL
    assert _first_column(_section(3)) == ours - BROKERS_OWN - INTERNAL


def test_kinds_and_statuses_are_the_protocols() -> None:
    """`x-burrow-kind` carries call, cast, submit or result; `x-status` ok or error (§3)."""
    assert sorted(v.HEADER_KINDS) == ["call", "cast", "result", "submit"]
    assert v.Kind.EVENT not in v.HEADER_KINDS
    assert [str(status) for status in v.Status] == ["ok", "error"]


def test_metric_label_sets_come_from_the_enums() -> None:
    """The zero-initialised label values of the metrics are the enums' members, in order."""
    assert list(metrics.DEAD_LETTER_REASONS) == [member.value for member in v.DeadReason]
    assert list(metrics.PUBLISH_KINDS) == [member.value for member in v.PublishKind]
    assert metrics.CALL_OUTCOMES[0] == v.Status.OK


@pytest.mark.parametrize(
    ("name", "event", "pattern"),
    [
        ("orders.eu.created", True, True),
        ("orders.*", False, True),
        ("orders.#", False, True),
        ("#", False, True),
        ("orders..created", False, False),
        ("orders.eu created", False, False),
        ("", False, False),
    ],
)
def test_event_names_and_topic_patterns(name: str, event: bool, pattern: bool) -> None:
    """An event name is dot-separated words; a topic pattern may also hold `*` and `#`."""
    assert v.is_event_name(name) is event
    assert v.is_topic_pattern(name) is pattern
