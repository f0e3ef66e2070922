"""Burrow: every operation of a service as a synchronous RPC and an asynchronous API over AMQP."""

from __future__ import annotations

from service import contracts, tracing
from service.app import App
from service.blocking import BlockingClient, BlockingJob, get_client
from service.client import Client
from service.codec import Model
from service.config import Settings, load_settings
from service.errors import (
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
from service.link import Outbound, Publishing, PublishNext
from service.middleware import Middleware, Next, Request, Result
from service.registry import Context, Lifespan, Operation, Service, State

__all__ = [
    "App",
    "BlockingClient",
    "BlockingJob",
    "BurrowError",
    "Client",
    "ClientUnusable",
    "ConfigError",
    "ConnectionLost",
    "Context",
    "DeadlineExceeded",
    "ErrorCode",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Lifespan",
    "MessageTooLarge",
    "Middleware",
    "Model",
    "Next",
    "NotFound",
    "Operation",
    "Outbound",
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
    "tracing",
]
