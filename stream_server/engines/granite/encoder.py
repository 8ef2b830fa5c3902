"""Granite's conformer encoder replayed from CUDA graphs, one per (batch, length) bucket.

The encoder is 16 conformer blocks of small kernels: run eagerly it costs ~1,000 kernel
launches per call (23 ms of host time at batch 1 on an H100, most of it launch overhead), and
the server calls it for every partial of every stream. Captured once per bucket, a call is one
graph launch plus a copy of the input.

Buckets: the batch is rounded up to a power of two (:func:`~.decode.batch_bucket`) and
the length to a multiple of ``frame_step`` encoder frames. The caller pads the *audio* (zeros)
to :meth:`EncoderGraphs.samples_for` of the bucket before computing features, so the padded
frames are the log-mel of silence, the same kind of padding as ``encoder_batching="padded"``;
rows past the real batch are zeros and their output is ignored. The encoder has no attention
mask, so padding changes the last frames' context slightly: like ``"padded"`` batching, graph
replay is an approximation of the one-by-one encoder, chosen for throughput.

All graphs share one memory pool and write their output into one preallocated buffer, so the
memory cost is one peak activation set plus ``max_batch x max_frames x hidden`` for the
output, whatever the number of buckets. The returned tensor is a view of that buffer: it is
valid until the next call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stream_server.engines.granite.decode import batch_bucket, capture_cuda_graph
from stream_server.engines.granite.features import max_samples_for_frames


def _replay_padded(graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, rows: torch.Tensor,
                   device: torch.device) -> None:
    """Copy ``rows`` into the first rows of the graph's static input, zero the rest, replay.

    The replay runs on the *current* device's stream, so it is made ``device``'s: a worker thread's
    current device is cuda:0 unless set, and an engine may live on cuda:1.
    """
    n = int(rows.shape[0])
    with torch.cuda.device(device):
        static_in[:n].copy_(rows)
        if n < static_in.shape[0]:
            static_in[n:].zero_()
        graph.replay()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor


class EncoderGraphs:
    """Replays ``encoder`` (a ``GraniteSpeechCTCEncoder``) from CUDA graphs.

    Args:
        encoder: the encoder module, on a CUDA device.
        max_batch: the largest batch the engine sends; larger batches run eagerly.
        max_seconds: the longest audio served from graphs; longer inputs run eagerly.
        frame_step: length quantum in encoder frames (50 frames = 1 s of audio).

    Raises:
        ValueError: the encoder is not on a CUDA device.
    """

    HOP = 160  # samples per feature frame; two feature frames make one encoder frame

    def __init__(self, encoder: torch.nn.Module, *, max_batch: int, max_seconds: float = 30.0, frame_step: int = 50):
        param = next(encoder.parameters())
        if param.device.type != "cuda":
            raise ValueError("encoder graphs need the encoder on a CUDA device")
        self.encoder = encoder
        self.device = param.device
        self.dtype = param.dtype
        self.frame_step = int(frame_step)
        self.max_batch = batch_bucket(max_batch)
        self.max_frames = self.bucket_frames(int(max_seconds * 16000) // (2 * self.HOP))
        linear = encoder.input_linear
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError("encoder graphs need an encoder whose input_linear is a Linear layer")
        self.input_dim = int(linear.in_features)
        self.hidden_dim = int(linear.out_features)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: tuple[int, int] | None = None  # torch.cuda.graph_pool_handle()
        self._out: torch.Tensor | None = None
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0

    def bucket_frames(self, frames: int) -> int:
        """``frames`` rounded up to the length quantum."""
        return max(self.frame_step, math.ceil(frames / self.frame_step) * self.frame_step)

    def samples_for(self, frames: int) -> int:
        """The most audio samples whose features are ``frames`` encoder frames (see .features).

        Every shorter clip has at most ``frames`` frames, so zero-padding a batch to this length
        gives exactly ``frames`` (:func:`~.features.max_samples_for_frames`).
        """
        return max_samples_for_frames(frames, self.HOP)

    def fits(self, batch: int, frames: int) -> bool:
        """Whether a batch of this size and (bucketed) length is served from a graph."""
        return batch_bucket(batch) <= self.max_batch and self.bucket_frames(frames) <= self.max_frames

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states of ``features``.

        Args:
            features: ``(batch, frames, input_dim)`` stacked log-mel features in the encoder's dtype,
                with ``frames`` already a multiple of ``frame_step`` (pad the audio, see above).

        Returns:
            ``(batch, frames, hidden)``: a view of the shared output buffer, valid until the next call
            (an eager result when the shape has no graph).
        """
        batch, frames = int(features.shape[0]), int(features.shape[1])
        if frames % self.frame_step or not self.fits(batch, frames):
            self.eager_calls += 1
            return self.encoder(features).last_hidden_state
        key = (batch_bucket(batch), frames)
        entry = self._graphs.get(key) or self._capture(*key)
        _replay_padded(entry.graph, entry.static_in, features, self.device)
        self.replays += 1
        assert self._out is not None
        return self._out[:batch, :frames]

    def warm(self, frames_buckets: list[int] | None = None, batches: list[int] | None = None) -> int:
        """Capture graphs ahead of traffic (a capture under load stalls that batch by its warm-up).

        Returns:
            Graphs captured by this call.
        """
        before = self.captures
        frames_buckets = frames_buckets or list(range(self.frame_step, self.max_frames + 1, self.frame_step))
        batches = batches or [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= self.max_batch]
        with torch.inference_mode():
            for b in batches:
                for t in frames_buckets:
                    if (b, t) not in self._graphs:
                        self._capture(b, t)
        return self.captures - before

    def _capture(self, batch: int, frames: int) -> _Graph:
        if self._out is None:
            self._out = torch.empty(self.max_batch, self.max_frames, self.hidden_dim, device=self.device, dtype=self.dtype)
            self._pool = torch.cuda.graph_pool_handle()
        static_in = torch.zeros(batch, frames, self.input_dim, device=self.device, dtype=self.dtype)
        out = self._out

        def run() -> None:
            out[:batch, :frames].copy_(self.encoder(static_in).last_hidden_state)

        graph, _ = capture_cuda_graph(run, self.device, self._pool)
        entry = _Graph(graph, static_in)
        self._graphs[(batch, frames)] = entry
        self.captures += 1
        return entry


class WindowGraphs:
    """Replays ``fn`` on a batch of fixed-size items from CUDA graphs, one per batch-size bucket.

    Used for Granite's projector, whose input is a stack of independent encoder windows
    ``(N, window, hidden)``: ``N`` is rounded up to a power of two (at least 8), rows past the
    real ones are zeros and their output is ignored.

    Args:
        fn: a capturable function of one ``(N, *item_shape)`` tensor returning one tensor whose
            first dimension is ``N`` and whose rows depend only on the matching input rows.
        item_shape: the shape of one item.
        device, dtype: of the input.
        max_windows: larger batches run eagerly.
    """

    def __init__(self, fn, item_shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype, max_windows: int):
        if torch.device(device).type != "cuda":
            raise ValueError("window graphs need a CUDA device")
        self.fn = fn
        self.item_shape = tuple(item_shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_windows = self.bucket(max_windows)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool: tuple[int, int] | None = None  # torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0

    @staticmethod
    def bucket(n: int) -> int:
        """``n`` rounded up to a power of two, at least 8."""
        return max(8, 1 << max(0, int(n) - 1).bit_length())

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        """``fn(items)``; a view valid until the next call of the same bucket when served from a graph."""
        n = int(items.shape[0])
        key = self.bucket(n)
        if key > self.max_windows:
            self.eager_calls += 1
            return self.fn(items)
        graph, static_in, static_out = self._graphs.get(key) or self._capture(key)
        _replay_padded(graph, static_in, items, self.device)
        self.replays += 1
        return static_out[:n]

    def warm(self, up_to: int | None = None) -> int:
        """Capture every bucket up to ``up_to`` items (default: all). Returns graphs captured."""
        before = self.captures
        limit = self.max_windows if up_to is None else min(self.bucket(up_to), self.max_windows)
        n = 8
        with torch.inference_mode():
            while n <= limit:
                if n not in self._graphs:
                    self._capture(n)
                n *= 2
        return self.captures - before

    def _capture(self, n: int):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_in = torch.zeros((n, *self.item_shape), device=self.device, dtype=self.dtype)
        graph, static_out = capture_cuda_graph(lambda: self.fn(static_in), self.device, self._pool)
        self._graphs[n] = (graph, static_in, static_out)
        self.captures += 1
        return self._graphs[n]


def plan_length_groups(lengths: list[int], bucket_frames, batch_bucket_fn=batch_bucket,
                       overhead_frames: int = 1000) -> list[list[int]]:
    """Split a batch into groups of similar length so that padding costs less than extra calls.

    The encoder graphs pad every row to the group's length bucket and every group to a power-of-two
    row count; one group of a 10 s and nine 2 s partials would encode ten (or sixteen) 10 s rows.
    Requests are sorted by length and cut where the length bucket changes, choosing the cuts that
    minimise ``sum(batch_bucket(rows) * bucket_frames(longest) + overhead_frames)`` (dynamic
    programming over at most one cut per bucket, so it is cheap for any batch).

    Args:
        lengths: encoder frames of each request.
        bucket_frames: rounds a length up to its bucket.
        batch_bucket_fn: rounds a row count up to its bucket.
        overhead_frames: the fixed cost of one more encoder call, in encoded frames.

    Returns:
        Groups of indices into ``lengths``, shortest first; every index appears once.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if len(order) <= 1:
        return [order] if order else []
    buckets = [bucket_frames(lengths[i]) for i in order]
    cuts = [0] + [k for k in range(1, len(order)) if buckets[k] != buckets[k - 1]] + [len(order)]
    best = [0.0] + [math.inf] * (len(cuts) - 1)
    back = [0] * len(cuts)
    for j in range(1, len(cuts)):
        for i in range(j):
            rows = cuts[j] - cuts[i]
            cost = best[i] + batch_bucket_fn(rows) * buckets[cuts[j] - 1] + overhead_frames
            if cost < best[j]:
                best[j], back[j] = cost, i
    groups, j = [], len(cuts) - 1
    while j > 0:
        i = back[j]
        groups.append(order[cuts[i] : cuts[j]])
        j = i
    return groups[::-1]
