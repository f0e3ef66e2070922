"""The protocol's words: every header and argument name, kinds, statuses, reasons; no I/O.

Each word of docs/protocol.md is spelled here once and imported everywhere else, together
with the names of exchanges and queues (`Names`) and the arithmetic of the delay ladder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# -- headers Burrow reads and writes (docs/protocol.md §3) -----------------------------------

# Burrow's own headers share it: a caller's header may not start with it.
BURROW_HEADER_PREFIX = "x-burrow-"
H_KIND = "x-burrow-kind"  # a `Kind` of HEADER_KINDS
H_DEADLINE = "x-deadline"  # absolute deadline, integer milliseconds since the Unix epoch
H_VERSION = "x-contract-version"  # major version of the service contract
H_STATUS = "x-status"  # on replies and completions: a `Status`
H_JOB_ID = "x-job-id"
H_CALLBACK = "x-callback-route"  # routing key on the events exchange for the completion
# Opaque text a submitter attaches for the callback route's consumer; copied onto that
# completion only (the gateway's webhook URL travels so: no store holds it).
H_CALLBACK_DATA = "x-callback-data"
MAX_CALLBACK_DATA = 4096  # characters; longer is treated as absent
H_TRACEPARENT = "traceparent"  # W3C trace context
H_TRACESTATE = "tracestate"  # W3C trace state, written and read by OpenTelemetry's propagator
# Dead letters (§8).
H_DEAD_REASON = "x-burrow-dead-reason"  # a `DeadReason`
H_DEAD_ERROR = "x-burrow-dead-error"  # the error body as JSON, or ""
H_ORIGINAL_EXCHANGE = "x-burrow-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-burrow-original-routing-key"
H_ORIGINAL_QUEUE = "x-burrow-original-queue"  # the queue it was taken from: a replay's target
H_DEAD_AT = "x-burrow-dead-at"  # integer ms since the epoch
# Delayed messages (§9).
H_TARGET_EXCHANGE = "x-burrow-target-exchange"
H_TARGET_KEY = "x-burrow-target-key"
H_DUE = "x-burrow-due"  # integer ms since the epoch; informational
# Retries (§10): how many retries were already made, written by Burrow on every retry copy.
# Burrow's own count: RabbitMQ 3.13+ no longer counts a republished x-death across trips.
H_ATTEMPT = "x-burrow-attempt"
MAX_ATTEMPT = 1_000_000  # a forged count is capped here (far above any `retries`)
# Set on receipt (never sent) when the AMQP properties as a whole could not be decoded.
MAX_DEADLINE_MS = 2**53  # x-deadline must be below this (a double holds it exactly)
H_UNDECODABLE = "x-burrow-undecodable"

DEAD_LETTER_HEADERS = (
    H_DEAD_REASON,
    H_DEAD_ERROR,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_ORIGINAL_QUEUE,
    H_DEAD_AT,
)

# -- headers the broker writes ---------------------------------------------------------------

H_DEATH = "x-death"
H_FIRST_DEATH_QUEUE = "x-first-death-queue"
H_FIRST_DEATH_REASON = "x-first-death-reason"
H_FIRST_DEATH_EXCHANGE = "x-first-death-exchange"
H_LAST_DEATH_QUEUE = "x-last-death-queue"
H_LAST_DEATH_REASON = "x-last-death-reason"
H_LAST_DEATH_EXCHANGE = "x-last-death-exchange"
H_DELIVERY_COUNT = "x-delivery-count"  # quorum queues: earlier deliveries
H_ACQUIRED_COUNT = "x-acquired-count"  # RabbitMQ 4.0+: earlier acquisitions

BROKER_HEADERS = (
    H_DEATH,
    H_FIRST_DEATH_QUEUE,
    H_FIRST_DEATH_REASON,
    H_FIRST_DEATH_EXCHANGE,
    H_LAST_DEATH_QUEUE,
    H_LAST_DEATH_REASON,
    H_LAST_DEATH_EXCHANGE,
    H_DELIVERY_COUNT,
    H_ACQUIRED_COUNT,
)

# -- queue arguments (§1.2) ------------------------------------------------------------------

ARG_QUEUE_TYPE = "x-queue-type"
ARG_MESSAGE_TTL = "x-message-ttl"
ARG_EXPIRES = "x-expires"
ARG_MAX_LENGTH = "x-max-length"
ARG_MAX_LENGTH_BYTES = "x-max-length-bytes"
ARG_OVERFLOW = "x-overflow"
ARG_DEAD_LETTER_EXCHANGE = "x-dead-letter-exchange"
ARG_DEAD_LETTER_ROUTING_KEY = "x-dead-letter-routing-key"
ARG_DEAD_LETTER_STRATEGY = "x-dead-letter-strategy"
ARG_DELIVERY_LIMIT = "x-delivery-limit"

# -- closed sets -----------------------------------------------------------------------------


class Kind(StrEnum):
    """What a message asks of a service (§4.2); an event is known by the queue it came from."""

    CALL = "call"
    CAST = "cast"
    SUBMIT = "submit"
    RESULT = "result"  # a call asking for a submitted job's record (§7.3)
    EVENT = "event"


HEADER_KINDS = frozenset(
    {Kind.CALL, Kind.CAST, Kind.SUBMIT, Kind.RESULT}
)  # what `x-burrow-kind` may say


class Status(StrEnum):
    """`x-status` of a reply or completion: `error` means the body is an error body (§11)."""

    OK = "ok"
    ERROR = "error"


class DeadReason(StrEnum):
    """`x-burrow-dead-reason`: why Burrow parked a message (§8); a metric label too."""

    MALFORMED = "malformed"
    INVALID = "invalid"
    UNSUPPORTED_CONTENT = "unsupported_content"
    TOO_LARGE = "too_large"
    UNKNOWN_OPERATION = "unknown_operation"
    MISSING_REPLY_TO = "missing_reply_to"
    INVALID_REPLY_TO = "invalid_reply_to"
    FAILED = "failed"
    RETRIES_EXHAUSTED = "retries_exhausted"
    UNDECODABLE = "undecodable"
    INVALID_TARGET = "invalid_target"
    JOB_ID_IN_USE = "job_id_in_use"
    INTERNAL = "internal"


class PublishKind(StrEnum):
    """What a publish is for: the `kind` label of `burrow_messages_published_total`."""

    REQUEST = "request"
    COMMAND = "command"
    REPLY = "reply"
    DEAD_LETTER = "dead_letter"
    EVENT = "event"
    COMPLETION = "completion"
    SCHEDULED = "scheduled"
    RETRY = "retry"


# -- names -----------------------------------------------------------------------------------

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # safe inside a queue name
_TOPIC = re.compile(r"^(\*|#|[A-Za-z0-9_-]+)(\.(\*|#|[A-Za-z0-9_-]+))*$")


def is_topic_pattern(pattern: str) -> bool:
    """True for a binding pattern of dot-separated words, `*` and `#`."""
    return _TOPIC.match(pattern) is not None


def is_event_name(name: str) -> bool:
    """True for an event name: dot-separated words, no wildcards."""
    return "*" not in name and "#" not in name and is_topic_pattern(name)


@dataclass(frozen=True, slots=True)
class Names:
    """The names of everything in a namespace (default `burrow`); see docs/protocol.md."""

    namespace: str

    @property
    def rpc_exchange(self) -> str:
        """Topic exchange for calls, keyed `<service>.<operation>`."""
        return f"{self.namespace}.rpc"

    @property
    def commands_exchange(self) -> str:
        """Topic exchange for casts and submits, keyed `<service>.<operation>`."""
        return f"{self.namespace}.commands"

    @property
    def events_exchange(self) -> str:
        """Topic exchange for domain events and job completion events."""
        return f"{self.namespace}.events"

    @property
    def dead_letter_exchange(self) -> str:
        """Direct exchange for dead letters, keyed by the dead-letter queue's name."""
        return f"{self.namespace}.dlx"

    def request_queue(self, service: str) -> str:
        """The queue a service consumes its calls from (may be bounded)."""
        return f"{self.namespace}.{service}.requests"

    def commands_queue(self, service: str) -> str:
        """The queue a service consumes casts and submits from (never bounded)."""
        return f"{self.namespace}.{service}.commands"

    def dead_letter_queue(self, service: str) -> str:
        """Where a service parks what it could not process, with the reason."""
        return f"{self.namespace}.{service}.dlq"

    def subscription_queue(self, group: str, name: str) -> str:
        """One queue per (group, subscription): a group's instances compete on it."""
        return f"{self.namespace}.{group}.{name}.events"

    def job_queue(self, job_id: str) -> str:
        """Before 0.2, one job's completion queue; a submit without a reply address still
        gets its completion there if the submitter declared it (docs/operations.md)."""
        return f"{self.namespace}.job.{job_id}"

    def job_key(self, job_id: str) -> str:
        """The job's record in the result store."""
        return f"{self.namespace}:job:{job_id}"

    def delay_exchange(self, level: int) -> str:
        """Entry of delay level `level` (see service.scheduler)."""
        return f"{self.namespace}.delay.{level}"

    def delay_queue(self, level: int) -> str:
        """Holds messages for 2**level delay units, then dead-letters them down a level."""
        return f"{self.namespace}.delay.{level}.wait"

    @property
    def delay_ready_queue(self) -> str:
        """Where delayed messages land when due, to be forwarded to their target."""
        return f"{self.namespace}.delay.ready"

    def retry_exchange(self, level: int) -> str:
        """Fanout entry of retry level `level`; the routing key names the queue to return to."""
        return f"{self.namespace}.retry.{level}"

    def retry_queue(self, level: int) -> str:
        """Holds a failed message for the level's back-off, then dead-letters it back."""
        return f"{self.namespace}.retry.{level}.wait"

    @property
    def scheduler_dead_letter_queue(self) -> str:
        """Delayed messages whose target no longer exists."""
        return self.dead_letter_queue("scheduler")


# -- the delay ladder (§9) -------------------------------------------------------------------

UNIT_MS = 100
LEVELS = 25  # (2**25 - 1) * 100 ms ≈ 38.8 days
MAX_DELAY_S = ((1 << LEVELS) - 1) * UNIT_MS / 1000


def level_pattern(level: int, bit: int) -> str:
    """Binding key matching routing keys whose digit for `level` is `bit` (MSB first)."""
    return "*." * (LEVELS - 1 - level) + f"{bit}.#"


def delay_route(units: int) -> str:
    """The routing key spelling `units` in binary, one word per level, most significant first."""
    if not 0 <= units < (1 << LEVELS):
        raise ValueError(f"delay of {units} units is outside the ladder")
    return ".".join(str((units >> level) & 1) for level in reversed(range(LEVELS)))
