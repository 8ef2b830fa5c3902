"""Support code for the tests and the benchmarks, never imported by the product.

The product packages (``stream_server``, ``vad``) must not import this package
(``tests/test_layout.py`` checks it); the tests and ``benchmarks`` both may. It ships with the
wheel only because ``granite-stream bench`` runs the benchmarks, which build on it.
"""
