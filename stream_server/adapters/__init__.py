"""Drop-in protocol adapters: foreign streaming-ASR APIs translated onto the native session core.

Each adapter is a sans-I/O translator (see :mod:`.base`) plus a route on the server's port, run by
the connection shell every route shares (:mod:`stream_server.server.connection`). Each module names
its ``ROUTE`` and ``translator``; :data:`ROUTES` collects them, and ``granite-stream serve`` hands that
table to the server (``StreamServer(routes=ROUTES)``), which imports no adapter:

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

from stream_server.server.connection import TranslatorFactory
from stream_server.adapters import deepgram, openai_realtime, twilio

ROUTES: dict[str, TranslatorFactory] = {
    openai_realtime.ROUTE: openai_realtime.translator,
    deepgram.ROUTE: deepgram.translator,
    twilio.ROUTE: twilio.translator,
}
"""Every adapter's WebSocket route: path -> translator factory (``StreamServer``'s ``routes``)."""

__all__ = ["ROUTES"]
