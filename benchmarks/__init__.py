"""Benchmarks and evaluation data for granite-stream.

``benchmarks.datasets`` fetches the pinned real-speech test data (Asterisk prompts,
pocketsphinx LibriVox clips) into a local cache and reads/writes JSON Lines manifests.
"""
