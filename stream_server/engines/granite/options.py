"""How a :class:`~stream_server.engines.granite.engine.GraniteEngine` runs: one frozen options object.

The engine's constructor takes the model (where it comes from, which device, which dtype) and one
:class:`GraniteOptions`; everything that chooses a backend, a batching strategy or a decoding policy
lives here, validated once, so that a configuration can be named, compared and printed.

Two presets name the configurations that matter (:data:`PRESETS`, :meth:`GraniteOptions.preset`):

- ``"exact"``: the reference. Each utterance is encoded alone and decoded by transformers'
  ``generate``; no CUDA graphs, no compiled step. Tokens equal ``processor + model.generate``.
- ``"fast"``: the served GPU path (``docs/granite_gpu.md``, ``GPU_PRESET`` in
  ``stream_server/settings.py``): padded encoder batching with the encoder and projector replayed
  from CUDA graphs, the static-cache greedy decode replayed from CUDA graphs, decode states sized
  from the free GPU memory, the compiled decode step kept where a warm-up decode shows it faster,
  batches of 64.

``GraniteOptions()`` itself is the engine's long-standing default: the backends chosen by device
(``"auto"``: graphs on CUDA, ``generate`` elsewhere) with exact encoder batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

from stream_server.inference.types import WorkerSettings

DEFAULT_TOKENS_PER_SECOND = 8.0
DEFAULT_TOKENS_PER_SECOND_BY_LANGUAGE = {"ja": 16.0, "zh": 12.0}
"""New-token budget rates by *output* language. Granite's BPE spends about one token per
Japanese or Chinese character (several characters per second of speech) where it spends one per
English word or word piece, so ``8 x seconds + 20`` cut long Japanese finals. Not measured on real
weights (none here); twice / 1.5x the default rate, leaving the EOS to end the decode."""

EncoderBatching = Literal["exact", "padded"]
EncoderBackend = Literal["auto", "eager", "graphs"]
DecodeBackend = Literal["auto", "generate", "loop", "graphs"]
CompileStep = bool | Literal["auto"]


@dataclass(frozen=True)
class GraniteOptions:
    """Backend, batching and decoding choices of a Granite engine; validated on construction.

    Attributes:
        max_batch: the largest batch the engine announces (and sizes its CUDA graphs for).
        encoder_batching: ``"exact"`` (each utterance featurised and encoded alone: a batch
            decodes as one by one) or ``"padded"`` (one zero-padded encoder batch: the HF
            processor's behaviour).
        encoder_backend: ``"eager"``, ``"graphs"`` (encoder and projector replayed from CUDA graphs
            per batch and 1 s length bucket; needs CUDA and ``encoder_batching="padded"``, whose
            approximation it shares) or ``"auto"`` (graphs where allowed).
        decode_backend: ``"generate"`` (transformers), ``"loop"`` (the engine's greedy loop over a
            static KV cache, eager), ``"graphs"`` (that loop replayed as CUDA graphs; CUDA only) or
            ``"auto"`` (graphs on CUDA, generate elsewhere). ``generate_kwargs`` forces generate.
        decode_max_graphs: decode states kept (graph + KV cache per batch x capacity bucket); 0
            sizes them from the free GPU memory at load.
        compile_step: ``torch.compile`` the decode step (``True``), not (``False``), or compile it
            and keep it only if a decode timed at warm-up is faster (``"auto"``).
        decode_extra: further ``StaticGreedyDecoder`` keyword arguments (e.g. ``{"fused": False}``).
        warm_decode_seconds: with the graphs decode backend, warm-up decodes a batch of every size
            bucket up to ``max_batch`` for each of these utterance lengths (empty: none).
        speculative: CTC self-speculative decoding for transcription finals (needs the CTC head).
        ctc_entropy_threshold, ctc_entropy_reduce: accept the CTC draft unverified when its frame
            entropy, reduced with ``"max"`` (IBM) or ``"mean"``, is at most the threshold.
        verify_threshold: accept a verified draft when every token's LLM probability is at least this.
        resume_from_draft: after a rejected draft, decode from its longest accepted prefix (the
            paper's step 3) instead of from scratch.
        word_timestamps: time and score the words of transcription finals from the CTC posteriors.
        repetition_guard: publish a looping final with its repeats collapsed.
        tokens_per_second, tokens_per_second_by_language, extra_new_tokens: the new-token budget
            ``ceil(seconds * tps) + extra``, ``tps`` per output language where listed.
        min_audio_samples: shorter clips are zero-padded to this many samples.
        generate_kwargs: extra ``GenerationConfig`` fields (non-empty: ``generate`` decodes).
    """

    max_batch: int = WorkerSettings.max_batch
    encoder_batching: EncoderBatching = "exact"
    encoder_backend: EncoderBackend = "auto"
    decode_backend: DecodeBackend = "auto"
    decode_max_graphs: int = 8
    compile_step: CompileStep = False
    decode_extra: Mapping[str, Any] = field(default_factory=dict)
    warm_decode_seconds: tuple[float, ...] = (3.0, 6.0, 12.0)
    speculative: bool = True
    ctc_entropy_threshold: float = 0.7
    ctc_entropy_reduce: Literal["max", "mean"] = "max"
    verify_threshold: float = 0.1
    resume_from_draft: bool = True
    word_timestamps: bool = True
    repetition_guard: bool = True
    tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND
    tokens_per_second_by_language: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_TOKENS_PER_SECOND_BY_LANGUAGE))
    extra_new_tokens: int = 20
    min_audio_samples: int = 512
    generate_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise the sequence and mappings so that two equal configurations compare equal.
        object.__setattr__(self, "warm_decode_seconds", tuple(float(s) for s in self.warm_decode_seconds))
        object.__setattr__(self, "tokens_per_second_by_language",
                           {k: float(v) for k, v in self.tokens_per_second_by_language.items()})
        object.__setattr__(self, "decode_extra", dict(self.decode_extra))
        object.__setattr__(self, "generate_kwargs", dict(self.generate_kwargs))
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.encoder_batching not in ("exact", "padded"):
            raise ValueError("encoder_batching must be 'exact' or 'padded'")
        if self.encoder_backend not in ("auto", "eager", "graphs"):
            raise ValueError("encoder_backend must be 'auto', 'eager' or 'graphs'")
        if self.encoder_backend == "graphs" and self.encoder_batching != "padded":
            raise ValueError("encoder_backend='graphs' needs encoder_batching='padded'")
        if self.decode_backend not in ("auto", "generate", "loop", "graphs"):
            raise ValueError("decode_backend must be 'auto', 'generate', 'loop' or 'graphs'")
        if self.decode_max_graphs < 0:
            raise ValueError("decode_max_graphs must be >= 1, or 0 (from free GPU memory)")
        if self.compile_step not in (False, True, "auto"):
            raise ValueError("compile_step must be False, True or 'auto'")
        if any(not s > 0 for s in self.warm_decode_seconds):
            raise ValueError("warm_decode_seconds must be positive")
        if self.ctc_entropy_reduce not in ("max", "mean"):
            raise ValueError("ctc_entropy_reduce must be 'max' or 'mean'")
        if not 0.0 <= self.verify_threshold <= 1.0:
            raise ValueError("verify_threshold must be a probability in [0, 1]")
        if not self.tokens_per_second > 0 or any(not r > 0 for r in self.tokens_per_second_by_language.values()):
            raise ValueError("tokens per second must be > 0")

    @staticmethod
    def preset(name: str, **overrides: Any) -> GraniteOptions:
        """The named preset (:data:`PRESETS`), with ``overrides`` replacing some of its fields.

        Raises:
            ValueError: unknown preset name or an invalid override.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown Granite preset {name!r}; choose one of {tuple(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def decoder_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~stream_server.engines.granite.decode.StaticGreedyDecoder`."""
        return {"max_graphs": self.decode_max_graphs, "compile_step": self.compile_step, **self.decode_extra}


PRESETS: dict[str, GraniteOptions] = {
    "default": GraniteOptions(),
    "exact": GraniteOptions(encoder_batching="exact", encoder_backend="eager", decode_backend="generate"),
    "fast": GraniteOptions(max_batch=64, encoder_batching="padded", encoder_backend="graphs",
                           decode_backend="graphs", decode_max_graphs=0, compile_step="auto"),
}
"""The named configurations: ``default`` (backends by device), ``exact`` (the transformers
reference) and ``fast`` (the served GPU path; CUDA only)."""

__all__ = ["DEFAULT_TOKENS_PER_SECOND", "DEFAULT_TOKENS_PER_SECOND_BY_LANGUAGE", "GraniteOptions", "PRESETS"]
