"""`Client`: what other Python services use to reach Burrow services (call; more faces later).

One client per process is enough: it multiplexes any number of concurrent calls over one
connection and one channel.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from service import codec
from service.config import Settings, load_settings
from service.registry import Operation
from service.rpc_client import RpcClient
from service.topology import Names
from service.transport import Link

__all__ = ["Client"]

M = TypeVar("M", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


class Client:
    """Calls operations of Burrow services over AMQP.

    Example:
        async with Client() as client:
            reply = await client.call("calc.add", {"a": 1, "b": 2})  # {"sum": 3}
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings or load_settings(**overrides)
        self.names = Names(self.settings.namespace)
        self.link = Link("client", self.settings)
        self.rpc = RpcClient(self.link, self.settings)

    async def start(self, timeout: float | None = None) -> None:
        """Connect and attach the reply consumer; raise `Unavailable` if the broker is away."""
        self.link.start()
        await self.link.wait_ready(self.settings.connect_timeout if timeout is None else timeout)

    async def close(self) -> None:
        """Close the connection; pending calls fail with `ConnectionLost`."""
        await self.link.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @overload
    async def call(
        self, operation: Operation[Any, Rep], payload: Any, *, timeout: float | None = None
    ) -> Rep: ...

    @overload
    async def call(
        self, operation: str, payload: Any, *, reply: type[M], timeout: float | None = None
    ) -> M: ...

    @overload
    async def call(self, operation: str, payload: Any, *, timeout: float | None = None) -> Any: ...

    async def call(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        reply: type[BaseModel] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call an operation and wait for its reply, at most `timeout` seconds.

        Args:
            operation: `"service.operation"`, or a declared `Operation` for a typed reply.
            payload: a pydantic model, or anything JSON-serialisable (dict, list…).
            reply: model to validate the reply into (default: the decoded JSON).
            timeout: the call's deadline in seconds (default: `BURROW_DEFAULT_DEADLINE`).

        Raises:
            ServiceError: the remote error, typed by its code; `DeadlineExceeded` at the
                deadline; `ConnectionLost` if the connection drops while waiting.
        """
        if isinstance(operation, Operation):
            route, reply = operation.route, reply or operation.reply
        else:
            route = operation
        body = await self.rpc.call_raw(route, codec.encode(payload), timeout=timeout)
        if reply is not None:
            return codec.decode_model(reply, body)
        return codec.decode_json(body)
