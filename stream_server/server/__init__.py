"""The network edge: the one WebSocket connection shell, the server (routes, admission, metrics,
health), HTTP file transcription, authentication, logging, and the driver that carries a session's
requests to an inference pool and its results back (shared with ``transcribe``)."""
