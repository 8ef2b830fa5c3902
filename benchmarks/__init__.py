"""Benchmarks for granite-stream (``granite-stream bench``).

The evaluation data they read (the pinned real-speech sets, manifests, audio reading, text
normalisation) lives in :mod:`granite_stream_testing`, which the tests use as well.
"""
