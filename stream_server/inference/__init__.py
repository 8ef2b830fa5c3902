"""The inference layer: the request/result/capability types shared by sessions and engines, the
batch scheduler and worker that run engines off the event loop, the Ray pool, and the process
memory upkeep (allocator arenas, oneDNN's primitive cache) that engines and the server both use."""
