"""Burrow: every operation of a service as a synchronous RPC and an asynchronous API over AMQP."""

from __future__ import annotations

from service import contracts, tracing
from service.app import App
from service.client import Client
from service.codec import Model
from service.config import Settings, load_settings
from service.errors import (
    BurrowError,
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
from service.registry import Context, Operation, Service

__all__ = [
    "App",
    "BurrowError",
    "Client",
    "ConfigError",
    "ConnectionLost",
    "Context",
    "DeadlineExceeded",
    "ErrorCode",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "MessageTooLarge",
    "Model",
    "NotFound",
    "Operation",
    "PermissionDenied",
    "PublishFailed",
    "QueueFull",
    "ResourceExhausted",
    "Service",
    "ServiceError",
    "Settings",
    "TopologyError",
    "Unavailable",
    "Unroutable",
    "contracts",
    "load_settings",
    "tracing",
]
