"""Burrow: every operation of a service as a synchronous RPC and an asynchronous API over AMQP."""

from __future__ import annotations

from service._amqp.link import Outbound, Publishing, PublishNext
from service._calling.client import Client
from service._calling.jobs import Job
from service._outbox.inbox import Inbox
from service._outbox.relay import Relay as OutboxRelay
from service._outbox.writer import Outbox
from service._protocol import contracts, tracing
from service._protocol.codec import Model
from service._protocol.config import Settings, load_settings
from service._protocol.errors import (
    BurrowError,
    ClientUnusable,
    ConfigError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    PublishFailed,
    QueueFull,
    ResourceExhausted,
    ServiceError,
    TopologyError,
    Unavailable,
    Unroutable,
)
from service._protocol.jobs import JobRecord, JobState, JobStatus
from service._protocol.registry import Context, Lifespan, Operation, Service, State
from service._runtime.app import App
from service._serving.middleware import Middleware, Next, Request, Result
from service._stores.base import Claim, IdempotencyStore, JobStore
from service._stores.registry import register_store
from service.blocking import BlockingClient, BlockingJob, get_client

__all__ = [
    "App",
    "BlockingClient",
    "BlockingJob",
    "BurrowError",
    "Claim",
    "Client",
    "ClientUnusable",
    "ConfigError",
    "ConnectionLost",
    "Context",
    "DeadlineExceeded",
    "ErrorCode",
    "FailedPrecondition",
    "IdempotencyStore",
    "Inbox",
    "Internal",
    "InvalidArgument",
    "Job",
    "JobRecord",
    "JobState",
    "JobStatus",
    "JobStore",
    "Lifespan",
    "MessageTooLarge",
    "Middleware",
    "Model",
    "Next",
    "NotFound",
    "Operation",
    "Outbound",
    "Outbox",
    "OutboxRelay",
    "PermissionDenied",
    "PublishFailed",
    "PublishNext",
    "Publishing",
    "QueueFull",
    "Request",
    "ResourceExhausted",
    "Result",
    "Service",
    "ServiceError",
    "Settings",
    "State",
    "TopologyError",
    "Unavailable",
    "Unroutable",
    "contracts",
    "get_client",
    "load_settings",
    "register_store",
    "tracing",
]
