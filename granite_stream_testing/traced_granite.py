"""A Granite engine that records its LLM tokens in each result's ``info``, for tests and benchmarks
(never served).

Tests and benchmarks compare decode paths token for token (batched against one by one, the graph
decoder against transformers' ``generate``, a resumed decode against a forced-prefix ``generate``);
the text alone would hide a difference after the first loop or under the repetition guard.
:class:`TracedGraniteEngine` records through the product engine's documented hooks
(:meth:`~stream_server.engines.granite.engine.GraniteEngine.on_decoded` and the public
:meth:`~stream_server.engines.granite.engine.GraniteEngine.verify` stage), so the product engine
itself has no debugging switch and the recorded tokens are the ones it published.
"""

from __future__ import annotations

from typing import Sequence

from stream_server.engines.granite.engine import Draft, GraniteEngine, Verification, Work


class TracedGraniteEngine(GraniteEngine):
    """:class:`GraniteEngine` whose results carry, in ``InferenceResult.info``:

    - ``"token_ids"``: every LLM decode's tokens after the request's prefix (a resumed draft's
      verified tokens first; EOS and padding cut; before any repetition collapse);
    - ``"verify_token_probs"`` / ``"verify_is_argmax"``: for each scored draft, the LLM's probability
      of each draft token and whether it was the greedy choice.

    Takes :class:`GraniteEngine`'s arguments; otherwise behaves (and decodes) as the product.
    """

    def on_decoded(self, work: Work, token_ids: list[int]) -> None:
        work.info["token_ids"] = list(token_ids)

    def verify(self, works: list[Work], drafts: Sequence[Draft]) -> list[Verification]:
        verdicts = super().verify(works, drafts)
        for w, v in zip(works, verdicts):
            if v.token_probs and v.is_argmax is not None:
                w.info["verify_token_probs"] = list(v.token_probs)
                w.info["verify_is_argmax"] = v.is_argmax.tolist()
        return verdicts


__all__ = ["TracedGraniteEngine"]
