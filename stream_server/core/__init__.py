"""The sans-I/O core: wire protocol, session state machine, stabilizer, audio decoding, multichannel
fan-out, word timings and captions. Synchronous and free of sockets, threads and engines; fed bytes,
commands and time, it returns events and inference requests (:mod:`stream_server.inference.types`)."""
