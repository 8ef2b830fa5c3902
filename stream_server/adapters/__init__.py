"""Drop-in protocol adapters: foreign streaming-ASR APIs translated onto the native session core.

Each adapter is a sans-I/O translator (see :mod:`.base`) plus a route on the server's port:

========================  ===========================================  ==========================
path                      protocol                                     module
========================  ===========================================  ==========================
``/v1/realtime``          OpenAI Realtime API, transcription sessions  :mod:`.openai_realtime`
``/deepgram/v1/listen``   Deepgram live transcription (v1 listen)      :mod:`.deepgram`
``/v1/twilio``            Twilio Media Streams (phone calls)           :mod:`.twilio`
========================  ===========================================  ==========================

Protocol v1 (``/v1/listen``) stays the native API; ``docs/protocol.md`` documents each adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import deepgram, openai_realtime, twilio

if TYPE_CHECKING:
    from ..server import StreamServer

ROUTES = {
    openai_realtime.ROUTE: openai_realtime.handle,
    deepgram.ROUTE: deepgram.handle,
    twilio.ROUTE: twilio.handle,
}


def install_adapters(server: "StreamServer") -> None:
    """Register every adapter's WebSocket route on ``server``."""
    for path, handler in ROUTES.items():
        server.add_route(path, handler)


__all__ = ["ROUTES", "install_adapters"]
