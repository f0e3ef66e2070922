"""Unit tests of `service.vocabulary`: the words agree with docs/protocol.md, the metrics' label
sets come from the enums, and the old import paths still name the same objects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import codec, dead_letters, jobs, metrics, scheduler, shim, topology, tracing
from service import vocabulary as v

__all__: list[str] = []

PROTOCOL = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()


def _section(number: int) -> str:
    return PROTOCOL.split(f"\n## {number}. ")[1].split("\n## ")[0]


def _first_column(text: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


def test_dead_reasons_are_the_reasons_of_the_protocol() -> None:
    """DeadReason is exactly the reason table of docs/protocol.md §8."""
    assert _first_column(_section(8)) == set(v.DeadReason)


def test_the_headers_of_the_protocol_are_the_vocabularys() -> None:
    """The header tables of docs/protocol.md §3 name exactly the headers Burrow reads and writes."""
    ours = {v.H_KIND, v.H_DEADLINE, v.H_VERSION, v.H_STATUS, v.H_JOB_ID, v.H_CALLBACK}
    ours.add(v.H_CALLBACK_DATA)
    ours |= {v.H_TRACEPARENT, v.H_TRACESTATE, *v.DEAD_LETTER_HEADERS}
    ours |= {v.H_TARGET_EXCHANGE, v.H_TARGET_KEY, v.H_ATTEMPT}
    assert _first_column(_section(3)) == {*ours, v.H_DUE, v.H_DEATH}


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
    ("old", "new"),
    [
        (codec.H_DEADLINE, v.H_DEADLINE),
        (codec.H_KIND, v.H_KIND),
        (jobs.H_JOB_ID, v.H_JOB_ID),
        (jobs.H_CALLBACK, v.H_CALLBACK),
        (scheduler.H_TARGET_EXCHANGE, v.H_TARGET_EXCHANGE),
        (scheduler.H_DUE, v.H_DUE),
        (dead_letters.H_DEAD_AT, v.H_DEAD_AT),
        (tracing.HEADER, v.H_TRACEPARENT),
        (shim.UNDECODABLE_HEADER, v.H_UNDECODABLE),
        (scheduler.LEVELS, v.LEVELS),
        (scheduler.delay_route, v.delay_route),
        (topology.Names, v.Names),
        (topology.DIRECT_REPLY_TO, v.DIRECT_REPLY_TO),
    ],
)
def test_old_import_paths_name_the_vocabularys_objects(old: object, new: object) -> None:
    """A word re-exported from its former module is the vocabulary's own object."""
    assert old is new


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
