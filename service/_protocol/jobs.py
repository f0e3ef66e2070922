"""What a job is on the wire and in a store: its id's form, its states, its record, and the
status a caller reads. Pure: no store and no link here (`service._stores` keeps records,
`service._calling.jobs` is the caller's handle).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from service._protocol import codec
from service._protocol.errors import ServiceError, error_from_wire
from service._protocol.vocabulary import JOB_ID_PATTERN, MAX_CALLBACK_DATA

_JOB_ID = re.compile(JOB_ID_PATTERN)
_ROUTE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,15}$")


class JobState(StrEnum):
    """Where a job stands in the store."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


_CODE = {JobState.RUNNING: b"r", JobState.COMPLETED: b"c", JobState.FAILED: b"f"}
_STATE = {code: state for state, code in _CODE.items()}
_OWNER = 32  # bytes of a sha256 digest


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job: its state, the digest of the submit that owns its id, its route, and (once
    finished) the completion body: the reply JSON, or an error body."""

    state: JobState
    owner: bytes
    route: str
    body: bytes = b""

    @property
    def finished(self) -> bool:
        """Completed or failed: the record is final."""
        return self.state is not JobState.RUNNING

    def encode(self) -> bytes:
        """State code, owner digest, route, a newline, the body."""
        return _CODE[self.state] + self.owner + self.route.encode() + b"\n" + self.body

    @classmethod
    def decode(cls, value: bytes) -> JobRecord | None:
        """The record, or None when `value` is not one (another program's key)."""
        state = _STATE.get(value[:1])
        route, newline, body = value[1 + _OWNER :].partition(b"\n")
        if state is None or len(value) < 1 + _OWNER or not newline:
            return None
        return cls(state, value[1 : 1 + _OWNER], route.decode("utf-8", "replace"), body)


def owner_digest(
    route: str,
    callback: str | None,
    message_id: str | None,
    body: bytes,
    callback_data: str | None = None,
) -> bytes:
    """What makes two deliveries the same submit: route, callback (and its data), message id
    and body."""
    digest = hashlib.sha256()
    parts = [route, callback or "", message_id or ""]
    if callback_data is not None:  # absent: the same digest as before callback data existed
        parts.append(callback_data)
    for part in parts:
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    digest.update(body)
    return digest.digest()


def valid_job_id(value: object) -> str | None:
    """The job id if it matches `[A-Za-z0-9_-]{1,64}`, else None."""
    return value if isinstance(value, str) and _JOB_ID.match(value) else None


def valid_callback(value: object) -> str | None:
    """The callback routing key if well-formed (plain words, no wildcards), else None."""
    return value if isinstance(value, str) and len(value) <= 255 and _ROUTE.match(value) else None


def valid_callback_data(value: object) -> str | None:
    """The callback's data if it is text of at most `MAX_CALLBACK_DATA` characters, else None."""
    return value if isinstance(value, str) and len(value) <= MAX_CALLBACK_DATA else None


@dataclass(frozen=True, slots=True)
class JobStatus:
    """Where a job stands: `running`, `completed` (with `result`) or `failed` (with `error`)."""

    id: str
    state: JobState
    result: Any = None
    error: ServiceError | None = None

    @property
    def finished(self) -> bool:
        """Completed or failed."""
        return self.state is not JobState.RUNNING

    @classmethod
    def of(cls, job_id: str, record: JobRecord) -> JobStatus:
        """The status a store record says."""
        if record.state is JobState.RUNNING:
            return cls(job_id, record.state)
        return cls.ended(
            job_id, codec.decode_json(record.body), failed=record.state is JobState.FAILED
        )

    @classmethod
    def ended(cls, job_id: str, value: Any, *, failed: bool) -> JobStatus:
        """A finished job: its result, or (failed) its error body."""
        if failed:
            return cls(job_id, JobState.FAILED, error=error_from_wire(value))
        return cls(job_id, JobState.COMPLETED, result=value)
