"""A Granite engine with forced decode lengths, for tests and benchmarks (never served).

Random-weight models never emit EOS on their own, and timing comparisons need every backend to
generate the same number of tokens; :class:`ForcedLengthGraniteEngine` fixes each LLM decode's
length through the product engine's :meth:`~stream_server.engines.granite.engine.GraniteEngine.token_budget`
hook, suppresses EOS and never speculates while a length is forced. It records its tokens as
:class:`~granite_stream_testing.traced_granite.TracedGraniteEngine` does: its users compare them.
"""

from __future__ import annotations

from typing import Any

from granite_stream_testing.traced_granite import TracedGraniteEngine
from stream_server.inference.types import SAMPLE_RATE, InferenceRequest


class ForcedLengthGraniteEngine(TracedGraniteEngine):
    """:class:`~stream_server.engines.granite.engine.GraniteEngine` whose decodes generate exactly a
    fixed number of tokens (and whose results carry them, as :class:`TracedGraniteEngine`'s do).

    Args:
        force_new_tokens: exactly this many tokens per LLM decode; ``None``: not fixed.
        force_tokens_per_second: exactly ``max(force_min_tokens, round(seconds * rate))`` tokens per
            request, proportional to the audio (load tests). Ignored when ``force_new_tokens`` is set.
        force_min_tokens: the floor of the per-second length.
        *args, **kwargs: :class:`GraniteEngine`'s. With neither force set it behaves as the product.

    Raises:
        ValueError: a forced length below 1 token or a rate that is not positive.
    """

    def __init__(self, *args: Any, force_new_tokens: int | None = None, force_tokens_per_second: float | None = None,
                 force_min_tokens: int = 4, **kwargs: Any) -> None:
        if force_new_tokens is not None and force_new_tokens < 1:
            raise ValueError("force_new_tokens must be >= 1")
        if force_tokens_per_second is not None and not force_tokens_per_second > 0:
            raise ValueError("force_tokens_per_second must be > 0")
        if force_min_tokens < 1:
            raise ValueError("force_min_tokens must be >= 1")
        self.force_new_tokens = force_new_tokens
        self.force_tokens_per_second = None if force_tokens_per_second is None else float(force_tokens_per_second)
        self.force_min_tokens = int(force_min_tokens)
        super().__init__(*args, **kwargs)

    @property
    def forced_lengths(self) -> bool:
        return self.force_new_tokens is not None or self.force_tokens_per_second is not None

    def token_budget(self, request: InferenceRequest, n_samples: int) -> int:
        if self.force_new_tokens is not None:
            return int(self.force_new_tokens)
        if self.force_tokens_per_second is not None:
            return max(self.force_min_tokens, int(round(n_samples / SAMPLE_RATE * self.force_tokens_per_second)))
        return super().token_budget(request, n_samples)


__all__ = ["ForcedLengthGraniteEngine"]
