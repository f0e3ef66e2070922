"""`burrow-unconfirmed`: Burrow's W1 and W2 rows with publisher confirms switched off (bench only).

Not a mode Burrow offers: the worker running this tool opens every aio-pika channel without
confirms, so a publish returns once its frames are queued, as `aio-pika-raw`'s do. Everything
else is Burrow's own path (the `<ns>.rpc` topic route, `expiration`, headers, validation,
metrics, ack after the reply). `python -m bench.hops` runs it beside `burrow` to show what
confirms cost Burrow's own code, as `aio-pika-raw-confirmed` shows it for hand-written code.
"""

from __future__ import annotations

from typing import Any

import aio_pika

from bench.tools.burrow_tool import open_caller, serve

__all__ = ["serve", "open_caller"]

_channel = aio_pika.Connection.channel


def _unconfirmed(
    self: aio_pika.Connection,
    channel_number: int | None = None,
    publisher_confirms: bool = True,  # ignored: always off, this tool's one difference
    on_return_raises: bool = False,
) -> Any:
    return _channel(
        self, channel_number, publisher_confirms=False, on_return_raises=on_return_raises
    )


aio_pika.Connection.channel = _unconfirmed  # type: ignore[method-assign]
