"""The caller commands' metadata, without a broker: `--header NAME=VALUE` is checked as the
client checks headers, `burrow job` takes every form of job id it is handed, and the `error:`
line names the message that failed (issue 26)."""

from __future__ import annotations

import pytest

from service import ConfigError, PermissionDenied
from service.cli import _headers, _job_reference, _parser, error_line

__all__: list[str] = []

HEX = "e24c" + "0" * 28


def test_header_options_become_text_headers() -> None:
    """Each `--header NAME=VALUE` (repeatable, `-H` too) is one text header; a value may hold
    `=` and be empty."""
    args = _parser().parse_args(
        ["call", "till.price", "{}", "--header", "x-service-token=se=cret", "-H", "x-empty="]
    )
    assert _headers(args.header) == {"x-service-token": "se=cret", "x-empty": ""}
    assert _headers(None) == {}
    for command in ("cast", "submit", "emit", "job"):
        given = ["job", "abc"] if command == "job" else [command, "a.b", "{}"]
        assert _parser().parse_args([*given, "-H", "k=v"]).header == ["k=v"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("no-equals-sign", "must look like NAME=VALUE"),
        ("=value", "must look like NAME=VALUE"),
        ("x-burrow-kind=call", "'x-burrow-kind' is one of Burrow's protocol headers"),
        ("traceparent=00-1-2-01", "'traceparent' is one of Burrow's protocol headers"),
    ],
)
def test_a_malformed_or_reserved_header_is_a_usage_error(option: str, message: str) -> None:
    """A malformed or protocol header is a ConfigError: one `error:` line, exit 2."""
    with pytest.raises(ConfigError, match=message):
        _headers([option])


def test_job_takes_an_id_the_json_submit_prints_or_a_gateway_id() -> None:
    """`burrow job` reads a bare id, `burrow submit`'s JSON line (so `burrow job $(burrow
    submit …)` works) and the gateway's `service.operation.<hex>` (which names its route)."""
    assert _job_reference(HEX, "") == (HEX, "")
    assert _job_reference(HEX, "orders.create") == (HEX, "orders.create")
    assert _job_reference(f'{{"job_id":"{HEX}"}}\n', "") == (HEX, "")
    assert _job_reference(f"orders.create.{HEX}", "") == (HEX, "orders.create")
    assert _job_reference(f'{{"job_id":"orders.create.{HEX}"}}', "orders.create") == (
        HEX,
        "orders.create",
    )
    with pytest.raises(ConfigError, match=r"is a job of orders\.create, not of orders\.cancel"):
        _job_reference(f"orders.create.{HEX}", "orders.cancel")
    with pytest.raises(ConfigError, match="not what burrow submit prints"):
        _job_reference('{"message_id": "x"}', "")


def test_id_only_is_offered_by_cast_and_submit() -> None:
    """`--id-only` prints the bare id: for cast and submit only."""
    assert _parser().parse_args(["submit", "a.b", "{}", "--id-only"]).id_only
    assert _parser().parse_args(["cast", "a.b", "{}", "--id-only"]).id_only
    with pytest.raises(SystemExit):
        _parser().parse_args(["call", "a.b", "{}", "--id-only"])


def test_error_line_names_the_message() -> None:
    """The one `error:` line carries the error's note: the message (and correlation) id."""
    refused = PermissionDenied("a valid x-service-token header is required")
    assert error_line(refused) == (
        "error: PERMISSION_DENIED: a valid x-service-token header is required"
    )
    refused.add_note("message_id=m1 correlation_id=m1")
    assert error_line(refused) == (
        "error: PERMISSION_DENIED: a valid x-service-token header is required "
        "(message_id=m1 correlation_id=m1)"
    )
