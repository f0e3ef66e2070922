"""Trace context parsing and propagation rules (W3C traceparent)."""

from __future__ import annotations

from service._protocol import tracing

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parse_accepts_valid_and_drops_hostile_values() -> None:
    """Only well-formed, non-zero traceparents survive parsing."""
    assert tracing.parse(VALID) == VALID
    assert tracing.parse(VALID.encode()) == VALID
    for bad in (None, 7, "", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", VALID + "x", "x" * 10_000):
        assert tracing.parse(bad) is None


def test_child_keeps_the_trace_and_changes_the_span() -> None:
    """An outgoing message continues the trace with a new span id."""
    child = tracing.child(VALID)
    assert tracing.parse(child) == child
    assert tracing.trace_id(child) == tracing.trace_id(VALID)
    assert child[36:52] != VALID[36:52]
    assert child.endswith("-01")


def test_child_of_nothing_starts_a_new_trace() -> None:
    """Without a current trace a fresh, valid one is made."""
    first, second = tracing.child(None), tracing.child(None)
    assert tracing.parse(first) == first
    assert tracing.trace_id(first) != tracing.trace_id(second)
