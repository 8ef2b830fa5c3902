"""IBM Granite Speech engine (transformers, torch), with CTC partials and self-speculative finals.

Pipeline per request (``transcribe_batch``):

1. **Features** — :mod:`~stream_server.engines.granite.features` (the HF extractor's formula, torch
   only). By default (``encoder_batching="exact"``) every utterance is featurised and encoded on
   its own (utterances of equal length share a call), so a batched decode gives the same result
   as decoding each utterance alone; ``"padded"`` reproduces the HF processor instead (one
   zero-padded batch through the encoder, whose block attention and convolutions then see the
   padding of the shorter rows).
2. **Encoder** — the conformer CTC encoder; its last hidden states feed both the projector and
   the **CTC head** (``encoder.out``: hidden → ``output_dim`` classes, the same layer the encoder
   uses at its middle block for self-conditioning). transformers 5.23 does not return the CTC
   logits, so the engine computes them as ``encoder.out(last_hidden_state)``, exactly like IBM's
   self-speculative decoding notebook (granite-speech-models, ``speculative_decoding_notebook``).
3. **Partials with ``partial_mode="ctc"``** stop here: greedy CTC (argmax, collapse repeats, drop
   blank) → text. No projector, no LLM.
4. **Finals (task ``transcribe``) — self-speculative decoding**: the greedy CTC transcript is a draft.
   If the CTC entropy (per frame, in nats, reduced over frames with ``max`` as IBM does, or
   ``mean``) is ≤ ``ctc_entropy_threshold`` and the request has no keywords, the draft is accepted
   (``ctc_accept``); otherwise the LLM scores the draft's tokens in one teacher-forced pass (the
   decoder's prefill with the ``loop``/``graphs`` backends, transformers' forward otherwise) and
   accepts it when every token's probability (softmax of the logits divided by the LM's
   ``logits_scaling``) is ≥ ``verify_threshold`` (``verify_accept``); otherwise greedy decoding
   resumes after the draft's longest passing prefix (``resumed``) or, with none, decodes from the
   prompt (``autoregressive``). :meth:`GraniteEngine.stats` counts the paths.
5. **LLM** — the user turn is ``<|audio|>`` (expanded to one placeholder per projector output)
   followed by the instruction, rendered with the tokenizer's chat template (``USER: {content}\\n
   ASSISTANT:`` for granite-4.0-1b-speech, also the fallback); the request's ``prefix`` is appended
   after the assistant tag so greedy decoding continues it. Rows are left-padded into one
   ``generate`` call (greedy); each row's new-token budget is ``ceil(seconds * tokens_per_second)
   + extra_new_tokens`` (the rate of the output language); benchmark subclasses fix it through
   :meth:`GraniteEngine.token_budget` and :attr:`GraniteEngine.forced_lengths` (exactly N tokens,
   EOS suppressed). A decode that spends its budget is reported
   ``truncated``; a looping final is published with its repeats collapsed.

CTC vocabulary: Granite Speech's encoder is trained on character targets and IBM decodes class
``i`` as the Unicode code point ``chr(i)`` with blank ``0`` (granite-4.0-1b-speech has 348 classes,
i.e. U+0001..U+015B: ASCII, Latin-1 and Latin Extended-A — enough for en/fr/de/es/pt, not for
Japanese, hence ``ctc_languages``). That is the default here; a checkpoint with another
character inventory passes ``ctc_vocab`` (a sequence whose item ``i`` is the text of class ``i``,
item ``blank_id`` ignored), e.g. read from a ``ctc_vocab.json`` shipped next to the weights.

Prompts (instruction strings): one table, :data:`PROMPT_SOURCES`, each entry with the reference
it is copied from (the model only follows the wording it was trained on; an unfamiliar one can
make it fall back to transcription). :class:`GranitePrompts` takes its defaults from that table.

Self-speculative finals follow the paper (Saon et al., "Self-Speculative Decoding for LLM-based
ASR with CTC Encoder Drafts", arXiv 2603.11243): (1) accept the CTC draft when its entropy is low,
(2) else verify it in one teacher-forced LLM pass, (3) else resume greedy decoding after the
longest verified prefix of the draft (``resume_from_draft``; IBM's notebook restarts from scratch,
``resume_from_draft=False``). With keywords the draft is never accepted unseen: the LLM pass
that decides sees the ``Keywords:`` prompt.
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from stream_server.inference.types import SAMPLE_RATE, EngineCapabilities, InferenceRequest, InferenceResult, Word
from stream_server.engines.base import Engine, ResultHook
from stream_server.engines.granite.ctc_align import (
    ALIGN_SOON_CELLS,
    AlignerThreads,
    align_words_many,
    align_words_soon,
    warm as warm_aligner,
    with_token_probabilities,
)
from stream_server.engines.granite.features import GraniteFeatureExtractor
from stream_server.engines.granite.options import (  # noqa: F401 - re-exported
    DEFAULT_TOKENS_PER_SECOND,
    DEFAULT_TOKENS_PER_SECOND_BY_LANGUAGE,
    GraniteOptions,
)
from stream_server.engines.whisper import collapse_repeats, looks_repetitive

__all__ = [
    "DEFAULT_MODEL_ID",
    "Draft",
    "GraniteEngine",
    "GraniteModelNotFoundError",
    "GranitePrompts",
    "GraniteCheckpointError",
    "PROMPT_SOURCES",
    "Verification",
    "Work",
    "load_granite",
]

DEFAULT_MODEL_ID = "ibm-granite/granite-4.0-1b-speech"
AUDIO_TOKEN = "<|audio|>"
FALLBACK_CHAT_TEMPLATE = "USER: {content}\n ASSISTANT:"

LANGUAGES = ("en", "fr", "de", "es", "pt", "ja")
LANGUAGE_NAMES = {
    # en/fr/de/pt/es as vLLM's granite_speech.py ISO639_1_SUPPORTED_LANGS spells them; the other
    # three are not in a reference table (vLLM passes an unknown code through unchanged).
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "ja": "Japanese",
    "it": "Italian",
    "zh": "Mandarin",
}
TRANSLATION_PAIRS = tuple((src, "en") for src in ("fr", "de", "es", "pt", "ja")) + tuple(
    ("en", dst) for dst in ("fr", "de", "es", "pt", "ja", "it", "zh")
)
CTC_LANGUAGES = ("en", "fr", "de", "es", "pt")

KNOWN_CTC_CLASSES = 348
"""granite-4.0-1b-speech's CTC head: class ``i`` is ``chr(i)``, blank 0 (U+0001..U+015B)."""

ENCODER_FRAME_S = 0.02
"""Seconds per encoder (and CTC) frame: 10 ms mel hop, two frames stacked (.features)."""

PATHS = ("ctc_accept", "verify_accept", "resumed", "autoregressive")


@dataclass(frozen=True)
class PromptSource:
    """One instruction string and the reference it is copied from."""

    text: str
    source: str


PROMPT_SOURCES: dict[str, PromptSource] = {
    "transcribe": PromptSource(
        "can you transcribe the speech into a written format?",
        "vLLM vllm/model_executor/models/granite_speech.py, GraniteSpeechForConditionalGeneration."
        "get_generation_prompt (task_type 'transcribe'); IBM granite-speech-models "
        "notebooks/speculative_decoding_notebook.ipynb (text_instruction)",
    ),
    "translate": PromptSource(
        "translate the speech to {language}",
        "vLLM vllm/model_executor/models/granite_speech.py, GraniteSpeechForConditionalGeneration."
        "get_generation_prompt (task_type 'translate': f'{audio_tok}translate the speech to "
        "{full_lang_name_to}'); IBM's granite-speech library ends the same sentence with a period (as "
        "issue 18 reports; that library was not among the stored references)",
    ),
    "keywords": PromptSource(
        "Keywords: {keywords}",
        "granite-4.0-1b-speech model card, 'Keyword list biasing': 'Can you transcribe the speech "
        "into a written format? Keywords: ...' (appended after the instruction, ', '-joined)",
    ),
}
"""Every instruction the engine sends, with its source (``<|audio|>`` comes first, then the text)."""


class GraniteModelNotFoundError(FileNotFoundError):
    """The Granite checkpoint is not available locally (the hub is never contacted)."""


class GraniteCheckpointError(ValueError):
    """The checkpoint loads, but this engine would serve it wrongly (missing LoRA, other features)."""


def check_checkpoint(model) -> None:
    """Refuse a model the engine would serve silently degraded.

    A config with ``has_lora_adapter: true`` (granite-speech-3.x) needs its LoRA adapter, which
    transformers loads only with peft installed; without it the LLM runs without the adapter and
    transcribes badly (transformers merely logs a warning). With the adapter loaded the engine
    keeps it on, as transformers' ``generate`` does whenever audio features are given (every
    decode here has audio).

    Raises:
        GraniteCheckpointError: the adapter is declared but not loaded.
    """
    if getattr(model.config, "has_lora_adapter", False) and not getattr(model, "_hf_peft_config_loaded", False):
        try:
            import peft  # noqa: F401

            why = "no adapter was loaded with it (adapter_config.json and the adapter weights missing?)"
        except ImportError:
            why = "peft is not installed, so transformers loaded it without the adapter (pip install peft)"
        raise GraniteCheckpointError(
            "this Granite Speech checkpoint declares a LoRA adapter (has_lora_adapter: true) but "
            f"{why}; it would transcribe badly, so it is refused")


FEATURE_SETTINGS = {"sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80}
"""The mel settings :class:`GraniteFeatureExtractor` implements (HF's extractor defaults)."""


def check_preprocessor(preprocessor: dict, config) -> None:
    """Refuse a ``preprocessor_config.json`` whose feature settings differ from the engine's.

    The engine computes the features itself (torch only, :mod:`.features`) with
    :data:`FEATURE_SETTINGS` and the model config's projector window and downsampling; a checkpoint
    trained on other features would get inputs it never saw.

    Raises:
        GraniteCheckpointError: naming each differing setting.
    """
    found = dict(preprocessor.get("melspec_kwargs") or {})
    # Newer transformers save the constructor's arguments at the top level instead.
    for key, name in (("sampling_rate", "sample_rate"), ("n_fft", "n_fft"), ("win_length", "win_length"),
                      ("hop_length", "hop_length"), ("n_mels", "n_mels"), ("feature_size", "n_mels")):
        if key in preprocessor:
            found.setdefault(name, preprocessor[key])
    bad = [f"{key}={found[key]!r} (engine: {value!r})" for key, value in FEATURE_SETTINGS.items()
           if key in found and found[key] != value]
    for key, attr in (("projector_window_size", "window_size"), ("projector_downsample_rate", "downsample_rate")):
        want = getattr(config, attr, None)
        if key in preprocessor and want is not None and int(preprocessor[key]) != int(want):
            bad.append(f"{key}={preprocessor[key]!r} (model config {attr}: {want!r})")
    if bad:
        raise GraniteCheckpointError("preprocessor_config.json does not match the engine's features: " + ", ".join(bad))


def _read_preprocessor(source: str, looks_like_path: bool, local_files_only: bool) -> dict | None:
    """The checkpoint's feature-extractor settings: ``preprocessor_config.json``, else the
    ``feature_extractor`` (or ``audio_processor``) part of a ``processor_config.json`` (newer
    transformers save processors that way); ``None`` where it has neither."""
    import json

    def find(name: str) -> str | None:
        if looks_like_path:
            path = os.path.join(source, name)
            return path if os.path.isfile(path) else None
        from transformers.utils import cached_file

        return cached_file(source, name, local_files_only=local_files_only,
                           _raise_exceptions_for_missing_entries=False)

    path = find("preprocessor_config.json")
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    path = find("processor_config.json")
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        for key in ("feature_extractor", "audio_processor"):
            if isinstance(data.get(key), dict):
                return data[key]
    return None


@dataclass(frozen=True)
class GranitePrompts:
    """Instruction strings of the user turn (after ``<|audio|>``).

    Attributes:
        transcribe: the ASR instruction.
        translate: the AST instruction; ``{language}`` is the target language's English name.
        keywords: appended when keywords are given; ``{keywords}`` is ``", "``-joined.
    """

    transcribe: str = PROMPT_SOURCES["transcribe"].text
    translate: str = PROMPT_SOURCES["translate"].text
    keywords: str = PROMPT_SOURCES["keywords"].text


def load_granite(
    name_or_path: str | os.PathLike = DEFAULT_MODEL_ID,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool = True,
):
    """Load ``(model, tokenizer)`` from a local directory or the local Hugging Face cache.

    Args:
        name_or_path: a directory holding the checkpoint, or a hub id looked up in the local cache only.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to bfloat16 on CUDA, float32 on CPU.
        local_files_only: keep ``True``; set ``False`` only on a host allowed to download.

    Raises:
        GraniteModelNotFoundError: the directory or cached checkpoint does not exist.
        GraniteCheckpointError: it would be served wrongly (:func:`check_checkpoint`,
            :func:`check_preprocessor`).
    """
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

    device = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = os.fspath(name_or_path)
    looks_like_path = os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)
    if looks_like_path:
        source = os.path.expanduser(source)
        if not os.path.isdir(source):
            raise GraniteModelNotFoundError(f"Granite model directory {source!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = GraniteSpeechForConditionalGeneration.from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only
        )
    except (OSError, ValueError) as exc:
        if looks_like_path:
            msg = f"Granite model directory {source!r} does not hold a loadable checkpoint"
        else:
            msg = (
                f"Granite model {source!r} is not in the local Hugging Face cache "
                "(loading is local-only; the hub is never contacted). Download it where the hub is "
                f"reachable (`hf download {source}`) and copy the cache (HF_HOME), or pass the checkpoint directory"
            )
        raise GraniteModelNotFoundError(f"{msg}. [transformers: {str(exc).splitlines()[0]}]") from exc
    preprocessor = _read_preprocessor(source, looks_like_path, local_files_only)
    if preprocessor is not None:
        check_preprocessor(preprocessor, model.config)
    check_checkpoint(model)
    # transformers declares PreTrainedModel.to with @wraps(torch.nn.Module.to), so type checkers see
    # the unbound torch method (self missing); the call is right.
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Work:
    """One request's state through the engine's stages, inside one ``transcribe_batch`` call or made
    by :meth:`GraniteEngine.prepare` for the public stages.

    Callers pass work items from stage to stage and may read ``req``, ``text``, ``path`` and ``info``
    (which becomes the result's ``info``, the place a test subclass records into); every other field
    is the engine's own, set and read by the stages in their order.
    """

    index: int
    req: InferenceRequest
    samples: torch.Tensor
    n_frames: int
    n_tokens: int
    hidden: torch.Tensor | None = None  # (n_frames, H), exact encoder output
    batch_hidden: torch.Tensor | None = None  # the padded (B, T, H) encoder output this row belongs to
    row: int = 0  # this request's row in batch_hidden
    hidden_for_projector: torch.Tensor | None = None  # what the projector consumes for this row
    audio_embeds: torch.Tensor | None = None  # (n_tokens, D)
    ctc_text: str | None = None
    ctc_entropy: float | None = None
    prefix_ids: list[int] | None = None  # the prefix tokenized, on first use (CTC partials never need it)
    draft_ids: list[int] = field(default_factory=list)  # the CTC draft's tokens after the prefix (verified drafts)
    resume_ids: list[int] = field(default_factory=list)  # verified draft tokens the decode continues after
    draft_probs: list[float] = field(default_factory=list)  # the LLM's probability of each draft token (verified)
    # The LLM tokens of the final after its prefix and the model's probability of each, where an LLM
    # pass produced or scored them (verified drafts, decodes); word confidences combine them.
    token_ids: list[int] = field(default_factory=list)
    token_probs: list[float] = field(default_factory=list)
    budget: int = 0

    def encoded(self) -> torch.Tensor:
        """This request's encoder output (its own, or its row of the padded batch's); after encoding only."""
        if self.hidden is not None:
            return self.hidden
        if self.batch_hidden is not None:
            return self.batch_hidden[self.row]
        raise RuntimeError("the request has not been encoded")

    def embeds(self) -> torch.Tensor:
        """This request's audio embeddings; after the projector only."""
        if self.audio_embeds is None:
            raise RuntimeError("the request has not been projected")
        return self.audio_embeds
    truncated: bool = False
    path: str = ""
    text: str | None = None
    info: dict = field(default_factory=dict)
    result: InferenceResult | None = None
    ctc_log_probs: np.ndarray | None = None  # (n_frames, classes) on the host, for word timings
    ctc_ready: Any = None  # on a GPU, the CUDA event after which ctc_log_probs holds its values
    words: tuple[Word, ...] | None = None  # the text's CTC-timed words, once aligned (_align_words)
    words_soon: Future | None = None  # the words, aligning on a thread since the text was known


@dataclass(frozen=True)
class Draft:
    """A transcription final's CTC draft (:meth:`GraniteEngine.draft`).

    Attributes:
        text: the whole draft, the request's prefix included: the final's text if the draft is accepted.
        token_ids: the tokens of the part after the prefix: what :meth:`GraniteEngine.verify` scores
            (empty: nothing to score, the draft is rejected).
    """

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Verification:
    """The LLM's teacher-forced verdict on one :class:`Draft` (:meth:`GraniteEngine.verify`).

    Attributes:
        token_probs: the LLM's probability of each draft token (softmax of ``lm_head / logits_scaling``).
        is_argmax: ``(len(token_probs),)`` bool tensor on the engine's device: whether each draft token
            is the LLM's greedy choice there. The engine does not read it (tests and benchmarks do).
        passed_prefix: how many leading draft tokens reach ``verify_threshold``: a rejected draft
            resumes after them (``resume_from_draft``).
        accepted: every token reaches ``verify_threshold``: the draft is the final.
    """

    token_probs: tuple[float, ...]
    is_argmax: torch.Tensor | None = field(compare=False)  # a tensor has no single truth value
    passed_prefix: int
    accepted: bool


class GraniteEngine(Engine):
    """Granite Speech behind the :class:`~stream_server.engines.base.Engine` interface.

    Build it from a checkpoint (``GraniteEngine("ibm-granite/granite-4.0-1b-speech")`` or a
    directory; local files only) or from a model already in memory
    (``GraniteEngine(model=model, tokenizer=tokenizer)``, e.g. the tiny random model of
    :func:`granite_stream_testing.tiny_granite.build_tiny_granite`).

    Args:
        model_name_or_path: hub id (looked up in the local cache only) or checkpoint directory;
            ignored when ``model`` is given.
        model, tokenizer: a ``GraniteSpeechForConditionalGeneration`` and its tokenizer (used as they are,
            on the model's device and dtype).
        device, dtype: for loading; default CUDA + bfloat16 when available, else CPU + float32.
        local_files_only: passed to ``from_pretrained``; keep ``True`` (no downloads).
        model_label: the ``model`` string announced in the capabilities (default: the id/path).
        options: backend, batching and decoding choices (:class:`~.options.GraniteOptions`;
            presets ``GraniteOptions.preset("exact")`` / ``("fast")``); default ``GraniteOptions()``.
        ctc_vocab: text of each CTC class (see the module docstring); ``None`` = ``chr(class)``, which
            is only trusted for the known 348-class head (:data:`KNOWN_CTC_CLASSES`): a head of any
            other size without a vocabulary is not used (no CTC partials, no speculation).
        ctc_blank_id: the CTC blank class.
        ctc_languages: languages whose CTC transcripts are usable (CTC partials and speculation);
            other languages fall back to the LLM.
        prompts: instruction strings.

    Subclasses for tests and benchmarks (``granite_stream_testing``) override the documented hooks
    :meth:`token_budget`, :attr:`forced_lengths`, :meth:`on_decoded` and the speculation stages
    :meth:`draft` / :meth:`verify`; the product engine has no debugging or benchmark switch.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = DEFAULT_MODEL_ID,
        *,
        model: Any = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = True,
        model_label: str | None = None,
        options: GraniteOptions | None = None,
        prompts: GranitePrompts | None = None,
        ctc_vocab: Sequence[str] | None = None,
        ctc_blank_id: int = 0,
        ctc_languages: Sequence[str] = CTC_LANGUAGES,
    ) -> None:
        if model is None:
            if tokenizer is not None:
                raise ValueError("tokenizer given without model")
            model, tokenizer = load_granite(
                model_name_or_path, device=device, dtype=dtype, local_files_only=local_files_only
            )
            label = model_label or os.fspath(model_name_or_path)
        else:
            if tokenizer is None:
                raise ValueError("model given without tokenizer")
            label = model_label or getattr(getattr(model, "config", None), "_name_or_path", "") or "granite-speech"
        opts = options if options is not None else GraniteOptions()
        check_checkpoint(model)

        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.features = GraniteFeatureExtractor.from_config(self.config)
        self.audio_token_id = int(self.config.audio_token_id)

        self.options = opts
        self.tokens_per_second = opts.tokens_per_second
        self.tokens_per_second_by_language = dict(opts.tokens_per_second_by_language)
        self.extra_new_tokens = opts.extra_new_tokens
        self.resume_from_draft = opts.resume_from_draft
        self.word_timestamps = opts.word_timestamps
        self._posteriors_stream: torch.cuda.Stream | None = None  # copies CTC posteriors to the host
        self.repetition_guard = opts.repetition_guard
        self.ctc_entropy_threshold = opts.ctc_entropy_threshold
        self.ctc_entropy_reduce = opts.ctc_entropy_reduce
        self.verify_threshold = opts.verify_threshold
        self.ctc_blank_id = int(ctc_blank_id)
        self.ctc_vocab = list(ctc_vocab) if ctc_vocab is not None else None
        self.ctc_languages = tuple(ctc_languages)
        self.encoder_batching = opts.encoder_batching
        self.prompts = prompts or GranitePrompts()
        self.min_audio_samples = max(opts.min_audio_samples, self.features.min_samples)
        self.generate_kwargs = dict(opts.generate_kwargs)
        decode_backend = opts.decode_backend
        if decode_backend == "auto":
            decode_backend = "graphs" if self.device.type == "cuda" else "generate"
        if decode_backend == "graphs" and self.device.type != "cuda":
            raise ValueError("decode_backend='graphs' needs the model on a CUDA device")
        self.decode_backend = decode_backend
        self.decode_options = opts.decoder_options()
        self._decoder = None
        encoder_backend = opts.encoder_backend
        if encoder_backend == "auto":
            encoder_backend = "graphs" if self.device.type == "cuda" and opts.encoder_batching == "padded" else "eager"
        if encoder_backend == "graphs" and self.device.type != "cuda":
            raise ValueError("encoder_backend='graphs' needs a CUDA device")
        self.encoder_backend = encoder_backend
        self.warm_decode_seconds = opts.warm_decode_seconds
        self._encoder_graphs = None
        self._projector_graphs = None
        self.compile_choice: dict | None = None  # with compile_step "auto": the warm-up timing that decided
        self.max_batch = opts.max_batch

        encoder = model.model.encoder
        head = getattr(encoder, "out", None)
        # chr(class) is IBM's mapping for the 348-class character head; another head's classes mean
        # something else, and reading them as code points would publish garbage partials.
        self.has_ctc = isinstance(head, torch.nn.Linear) and (
            self.ctc_vocab is not None or int(head.out_features) == KNOWN_CTC_CLASSES)
        self.speculative = opts.speculative and self.has_ctc
        text_config = self.config.text_config
        self.logits_scaling = float(getattr(text_config, "logits_scaling", 1.0) or 1.0)

        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(int(e) for e in gen_eos)
        if not eos:
            raise ValueError("the tokenizer has no eos token")
        self.eos_ids = sorted(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

        self._prompt_cache: dict[str, tuple[list[int], list[int]]] = {}
        self._aligner_threads = AlignerThreads()  # released by close()
        self._stats: dict[str, int] = {p: 0 for p in PATHS}
        self._stats.update({"partial_llm": 0, "partial_ctc": 0, "truncated": 0, "repetition_loops": 0})

        self.capabilities = EngineCapabilities(
            name="granite",
            model=str(label),
            languages=LANGUAGES,
            tasks=("transcribe", "translate"),
            translation_pairs=TRANSLATION_PAIRS,
            keywords=True,
            partial_modes=("llm", "ctc") if self.has_ctc else ("llm",),
            prefix=True,
            max_batch=self.max_batch,
            language_detection=False,
            early_results=True,
        )

    @property
    def forced_lengths(self) -> bool:
        """Whether :meth:`token_budget` fixes each decode's length (a benchmark subclass's choice):
        then EOS is suppressed and finals never speculate. ``False`` for the product engine."""
        return False

    def token_budget(self, request: InferenceRequest, n_samples: int) -> int:
        """New tokens one LLM decode of ``request`` (``n_samples`` of audio) may generate:
        ``ceil(seconds * rate) + extra_new_tokens``, the rate of the output language."""
        output_language = (request.target_language or "en") if request.task == "translate" else request.language
        rate = self.tokens_per_second_by_language.get(output_language or "", self.tokens_per_second)
        return int(math.ceil(n_samples / SAMPLE_RATE * rate)) + self.extra_new_tokens

    def on_decoded(self, work: Work, token_ids: list[int]) -> None:
        """Hook, called once per LLM decode of a request (partial or final) before its result is made:
        ``token_ids`` are the answer's tokens after the request's prefix (a resumed draft's verified
        tokens first), EOS and padding cut, before any repetition collapse. The product does nothing;
        a test subclass records them (``work.info`` becomes the result's ``info``)."""

    # ------------------------------------------------------------------ public API
    def placement(self) -> str:
        return str(self.device)

    def bind_thread(self) -> None:
        if self.device.type == "cuda":
            # CUDA-graph capture and replay use the current device's streams; a new thread's is cuda:0.
            torch.cuda.set_device(self.device)

    def warmup(self, graph_seconds: float = 12.0) -> None:
        """One tiny decode, then (with ``encoder_backend="graphs"``) capture the encoder and projector
        graphs for every batch bucket and every length up to ``graph_seconds``, and (with the
        ``graphs`` decode backend) the decode states of ``warm_decode_seconds``, so that captures do
        not stall live traffic (each costs two runs of its shape); other shapes capture on first use.
        The engine's path counters are zeroed afterwards; the word aligner's compiled Viterbi is
        loaded (or compiled, about a second, once per install) so that the first final does not wait."""
        if self.word_timestamps and self.has_ctc:
            warm_aligner()
        super().warmup()
        encoder_graphs = self.encoder_graphs
        if encoder_graphs is not None:
            step = encoder_graphs.frame_step
            encoder_graphs.warm(list(range(step, encoder_graphs.bucket_frames(int(graph_seconds * 50)) + 1, step)))
            window = self.model.model.projector.window_size
            self.projector_graphs.warm(up_to=self.max_batch * -(-int(graph_seconds * 50) // window))
        self._warm_decode()
        if self._choose_compile_step():
            self._warm_decode()  # the switch dropped the captured states
        self._stats = {key: 0 for key in self._stats}  # warm-up decodes are not traffic

    def _warm_decode(self) -> None:
        """Decode a batch of each size bucket for each ``warm_decode_seconds`` length (graphs backend).

        Smallest batches first: the decoder keeps its most recently used states, and under load the
        large batches are the ones that matter. Speculation is off meanwhile so that every row
        reaches the decoder (a draft accepted from silence would skip it).
        """
        if self.decode_backend != "graphs" or not self.warm_decode_seconds:
            return
        from stream_server.engines.granite.decode import batch_bucket

        sizes = sorted({min(batch_bucket(b), self.max_batch) for b in range(1, self.max_batch + 1)})
        language = self.capabilities.languages[0] if self.capabilities.languages else None
        speculative, self.speculative = self.speculative, False
        try:
            for rows in sizes:
                for seconds in self.warm_decode_seconds:
                    audio = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
                    self.transcribe_batch([InferenceRequest("warmup", i, "final", audio, language=language)
                                           for i in range(rows)])
                    if speculative and self._fast_verify:
                        self._warm_verify(rows, seconds)
        finally:
            self.speculative = speculative

    def _warm_verify(self, rows: int, seconds: float, draft_tokens_per_second: float = 4.0) -> None:
        """Capture the draft-scoring pass for ``rows`` utterances of ``seconds`` with a typical draft
        (about 4 tokens per second of speech); other prompt lengths capture on first use."""
        request = InferenceRequest("warmup", 0, "final", np.zeros(int(seconds * SAMPLE_RATE), np.float32))
        w = self._prepare(0, request)
        length = len(self._sequence(w)) + int(seconds * draft_tokens_per_second)
        hidden = int(self.config.text_config.hidden_size)
        embeds = torch.zeros((rows, length, hidden), dtype=self.dtype, device=self.device)
        mask = torch.ones((rows, length), dtype=torch.long, device=self.device)
        self.decoder.hidden_states(embeds, mask, pad_token_id=self.pad_id, eos_token_ids=self.eos_ids)

    def _choose_compile_step(self, measure=None) -> bool:
        """With ``decode_options["compile_step"] == "auto"``: time a decode with the compiled step and
        one without, keep the faster (:attr:`compile_choice` records both), and say whether the
        decoder's captured states were dropped by the switch.

        Args:
            measure: ``() -> seconds`` for one timed decode under the current step (tests pass their
                own); default :meth:`_time_decode`.
        """
        if self.decode_options.get("compile_step") != "auto" or self.decode_backend not in ("loop", "graphs"):
            return False
        decoder = self.decoder
        if decoder._compiled_layer is None:  # not fusable (LoRA, biases): nothing to choose
            return False
        measure = measure or self._time_decode
        decoder.use_compiled(True)
        compiled_s = measure()
        decoder.use_compiled(False)
        eager_s = measure()
        keep = compiled_s < eager_s
        decoder.use_compiled(keep)
        self.compile_choice = {"compiled_s": compiled_s, "eager_s": eager_s, "kept": "compiled" if keep else "eager"}
        return True

    def _time_decode(self, repeats: int = 3, tokens: int = 32) -> float:
        """Median seconds of the decoder producing ``tokens`` tokens (EOS suppressed) for a full batch
        of the longest warm-up length: the step function's cost alone. (A decode of silence through
        :meth:`transcribe_batch` would end at the model's first EOS and time little of it.)"""
        import time

        seconds = max(self.warm_decode_seconds or (6.0,))
        language = self.capabilities.languages[0] if self.capabilities.languages else None
        audio = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
        works = [self._prepare(i, InferenceRequest("warmup", i, "final", audio, language=language))
                 for i in range(self.max_batch)]
        with torch.inference_mode():
            self._encode_audio(works)
            self._project(works)
            embeds, mask, _ = self._embed_batch([self._sequence(w) for w in works], [w.embeds() for w in works])
        times = []
        for i in range(repeats + 1):  # the first run captures (or compiles): not timed
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            self.decoder.generate(embeds, mask, tokens, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id,
                                  suppress_eos=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i:
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def stats(self) -> dict:
        """Counters: final decode paths (``ctc_accept``, ``verify_accept``, ``resumed``, ``autoregressive``),
        partials (``partial_ctc``, ``partial_llm``), finals that hit their budget (``truncated``) and
        finals whose loops were collapsed (``repetition_loops``)."""
        return dict(self._stats)

    def reset_stats(self) -> None:
        """Zero the :meth:`stats` counters (e.g. after a warm-up that is not traffic)."""
        self._stats = {k: 0 for k in self._stats}

    # ------------------------------------------------------------------ stages (benchmarks, tools)
    # transcribe_batch runs these in order (a final that speculates: prepare, encode, ctc, project,
    # draft, verify, then decode only if the draft is rejected; publishing is not a stage); they are
    # public so that a benchmark can time one stage on the product's own code path, and a test or
    # benchmark subclass may override draft and verify (the speculation stages, with the LLM below).
    def prepare(self, requests: Sequence[InferenceRequest]) -> list[Work]:
        """Stage 0: one work item per request (audio padded to the minimum, token budget set)."""
        return [self._prepare(i, r) for i, r in enumerate(requests)]

    def encode(self, works: list[Work]) -> None:
        """Stage 1: features, encoder and CTC head for ``works`` (per ``encoder_batching``/``encoder_backend``).

        Clears any audio embeddings from an earlier :meth:`project`, so that a timed loop of
        ``encode`` + ``project`` does the whole work each time."""
        for w in works:
            w.audio_embeds = None
        self._encode_audio(works)

    def ctc(self, works: list[Work]) -> None:
        """Stage 1b: greedy CTC text and frame entropy (one batched pass) for every encoded work item
        that has none yet: a CTC partial's text, or a final's draft (:meth:`draft`)."""
        self._ctc_decode(works)

    def project(self, works: list[Work]) -> None:
        """Stage 2: the projector: LLM audio embeddings for every encoded work item that has none."""
        self._project(works)

    def project_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """The projector itself: ``(N, window_size, H)`` encoder frames -> ``(N, window_size //
        downsample_rate, D)`` embeddings, each window independently (eager; :meth:`project` replays it
        from CUDA graphs with ``encoder_backend="graphs"``)."""
        projector = self.model.model.projector
        queries = projector.qformer(query_embeds=projector.query, encoder_hidden_states=windows,
                                    encoder_attention_mask=None, return_dict=True).last_hidden_state
        return projector.linear(queries)

    def prompt_embeddings(self, works: list[Work]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3: the batch's left-padded prompt embeddings (audio placed) and attention mask."""
        embeds, mask, _ = self._embed_batch([self._sequence(w) for w in works], [w.embeds() for w in works])
        return embeds, mask

    def decode(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *,
               suppress_eos: bool = False) -> torch.Tensor:
        """Stage 4: greedy decode of up to ``max_new_tokens`` (exactly that many with ``suppress_eos``)
        on this engine's ``decode_backend``; returns the new token ids, one row per prompt."""
        if self.decode_backend in ("loop", "graphs") and not self.generate_kwargs:
            return self.decoder.generate(embeds, mask, max_new_tokens, eos_token_ids=self.eos_ids,
                                         pad_token_id=self.pad_id, suppress_eos=suppress_eos)
        return self._hf_generate(embeds, mask, max_new_tokens, suppress_eos)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        self._aligner_threads.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def transcribe_batch(self, requests: Sequence[InferenceRequest],
                         on_result: ResultHook | None = None) -> list[InferenceResult]:
        """See :class:`Engine`; ``on_result(index, result)``, if given, receives each CTC partial as soon as
        its CTC pass is done, before the batch's finals are decoded (``capabilities.early_results``)."""
        if self.model is None:
            raise RuntimeError("engine is closed")
        if not requests:
            return []
        with torch.inference_mode():
            return self._transcribe(list(requests), on_result)

    # ------------------------------------------------------------------ prompt
    def instruction(self, req: InferenceRequest) -> str:
        """The user-turn instruction (after ``<|audio|>``) for a request."""
        if req.task == "translate":
            target = req.target_language or "en"
            text = self.prompts.translate.format(language=LANGUAGE_NAMES.get(target, target))
        else:
            text = self.prompts.transcribe
        keywords: list[str] = []
        for kw in req.keywords or ():
            cleaned = " ".join(str(kw).split())
            if cleaned and cleaned not in keywords:
                keywords.append(cleaned)
        if keywords:
            base = text.rstrip()
            if base and not base.endswith((".", "!", "?")):
                base += "."
            text = f"{base} {self.prompts.keywords.format(keywords=', '.join(keywords))}".strip()
        return text

    def prompt_text(self, instruction: str) -> str:
        """The rendered prompt (one ``<|audio|>`` placeholder) up to and including the assistant tag."""
        content = AUDIO_TOKEN + instruction
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            if isinstance(text, str) and text.count(AUDIO_TOKEN) == 1:
                return text
        return FALLBACK_CHAT_TEMPLATE.format(content=content)

    def _prompt_ids(self, instruction: str) -> tuple[list[int], list[int]]:
        cached = self._prompt_cache.get(instruction)
        if cached is None:
            before, after = self.prompt_text(instruction).split(AUDIO_TOKEN)
            cached = (self._encode(before), self._encode(after))
            self._prompt_cache[instruction] = cached
        return cached

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _sequence(self, w: Work, extra: Sequence[int] = ()) -> list[int]:
        before, after = self._prompt_ids(self.instruction(w.req))
        return before + [self.audio_token_id] * w.n_tokens + after + self._prefix_ids(w) + w.resume_ids + list(extra)

    # ------------------------------------------------------------------ main flow
    def _transcribe(self, requests: list[InferenceRequest], on_result=None) -> list[InferenceResult]:
        works = [self._prepare(i, r) for i, r in enumerate(requests)]
        self._encode_audio(works)
        self._ctc_posteriors([w for w in works if self._timed(w.req)])

        llm: list[Work] = []
        verify: list[Work] = []
        for w in works:
            req = w.req
            ctc_ok = self._ctc_usable(req)
            if req.kind == "partial":
                if req.partial_mode == "ctc" and ctc_ok:
                    w.path = "partial_ctc"
                else:
                    w.path = "partial_llm"
                    if req.partial_mode == "ctc":
                        w.info["ctc_unavailable"] = True
                    llm.append(w)
            elif self.speculative and ctc_ok and not self.forced_lengths:
                w.path = "speculate"
            else:
                w.path = "autoregressive"
                llm.append(w)
        # One batched CTC pass serves the CTC partials and the speculative drafts alike.
        self._ctc_decode([w for w in works if w.path in ("partial_ctc", "speculate")])
        for w in works:
            req = w.req
            if w.path == "partial_ctc":
                w.text = _force_prefix(req.prefix, w.ctc_text or "")
                w.info["ctc_entropy"] = w.ctc_entropy
                if on_result is not None:
                    on_result(w.index, self._result(w))
            elif w.path == "speculate":
                w.info["ctc_entropy"] = w.ctc_entropy
                draft = w.ctc_text or ""
                if (
                    draft
                    and not req.keywords  # the LLM must see the keywords before a draft is final
                    and draft.startswith(req.prefix)
                    and w.ctc_entropy is not None
                    and w.ctc_entropy <= self.ctc_entropy_threshold
                ):
                    w.path = "ctc_accept"
                    w.text = draft
                else:
                    verify.append(w)

        if verify:
            self._project([w for w in verify])
            drafts = [self.draft(w) for w in verify]
            for w, d in zip(verify, drafts):
                w.info["draft"] = d.text
            for w, d, verdict in zip(verify, drafts, self.verify(verify, drafts)):
                if d.token_ids:
                    w.info["verify_prefix_tokens"] = verdict.passed_prefix  # leading tokens that passed
                if verdict.accepted:
                    w.path = "verify_accept"
                    w.text = d.text
                    w.token_ids, w.token_probs = w.draft_ids, w.draft_probs
                    continue
                kept = verdict.passed_prefix
                if self.resume_from_draft and kept > 0:
                    # The paper's step 3: greedy decoding resumes after the verified part of the draft.
                    w.path = "resumed"
                    w.resume_ids = w.draft_ids[:kept]
                else:
                    w.path = "autoregressive"
                llm.append(w)
        if llm:
            # Finals whose text is already known align on threads while the LLM decodes the rest.
            self._align_soon([w for w in works if w.path in ("ctc_accept", "verify_accept")])
            self._project(llm)
            self._generate(llm)

        # The batch's finals align together (on threads when long: ctc_align.align_words_many).
        self._align_words([w for w in works if w.result is None])
        return [w.result if w.result is not None else self._result(w) for w in works]

    def _timed(self, req: InferenceRequest) -> bool:
        """Whether this request's result gets word timings (a transcription final in a CTC language)."""
        return self.word_timestamps and req.kind == "final" and self._ctc_usable(req)

    def _ctc_posteriors(self, works: list[Work]) -> None:
        """CTC log posteriors of each work's valid frames, copied to the host in one transfer."""
        rows = [w for w in works if w.hidden is not None or w.batch_hidden is not None]
        if not rows:
            return
        with torch.inference_mode():
            hidden = torch.nn.utils.rnn.pad_sequence(
                [w.encoded()[: w.n_frames] for w in rows],
                batch_first=True)
            logp = torch.log_softmax(self.ctc_logits(hidden), dim=-1)
            ready = None
            if logp.is_cuda:
                # Copied on a side stream into pinned memory: the host does not wait for the encoder
                # here and the copy overlaps the LLM decode queued next; aligners wait for ``ready``.
                if self._posteriors_stream is None:
                    self._posteriors_stream = torch.cuda.Stream(logp.device)
                side = self._posteriors_stream
                side.wait_stream(torch.cuda.current_stream(logp.device))
                host = torch.empty(logp.shape, dtype=logp.dtype, pin_memory=True)
                with torch.cuda.stream(side):
                    host.copy_(logp, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(side)
                logp.record_stream(side)  # not reused by the main stream before the copy has run
                logp_host = host.numpy()
            else:
                logp_host = logp.numpy()
        for i, w in enumerate(rows):
            w.ctc_log_probs = logp_host[i, : w.n_frames]
            w.ctc_ready = ready

    def _ctc_usable(self, req: InferenceRequest) -> bool:
        """Whether the CTC head's transcript serves this request (partials and speculative drafts)."""
        return self.has_ctc and req.language in self.ctc_languages and req.task == "transcribe"

    def _result(self, w: Work) -> InferenceResult:
        """The work's result, made (and its path counted) once."""
        if w.result is None:
            req = w.req
            if w.path in self._stats:
                self._stats[w.path] += 1
            w.info["path"] = w.path
            lang = (req.target_language or "en") if req.task == "translate" else req.language
            text = w.text or req.prefix
            timed = w.words is not None or w.words_soon is not None or w.ctc_log_probs is not None
            # The spans first: meanwhile this final may still be aligning on a thread.
            spans = self._token_spans(text, w.token_ids, w.token_probs) if timed and w.token_probs else None
            self._align_words([w])  # a no-op when its batch aligned it
            words = w.words
            if words and spans is not None:
                words = with_token_probabilities(text, words, spans)
            confidence = round(float(np.mean([x.confidence for x in words])), 3) if words else None
            w.result = InferenceResult(text=text, language=lang, info=w.info, truncated=w.truncated,
                                       words=words or None, confidence=confidence)
        return w.result

    def _align_words(self, works: list[Work]) -> None:
        """Time the words of each of ``works`` that has CTC posteriors (a timed final) into its
        ``words``, all together (:func:`align_words_many`), and drop the posteriors."""
        for w in works:
            if w.words_soon is not None:
                w.words, w.words_soon = w.words_soon.result(), None
        timed = [w for w in works if w.ctc_log_probs is not None]
        for w in timed:
            if w.ctc_ready is not None:
                w.ctc_ready.synchronize()
                w.ctc_ready = None
        finals = [(w.text or w.req.prefix, w.ctc_log_probs) for w in timed if w.ctc_log_probs is not None]
        for w, words in zip(timed, align_words_many(finals, self._ctc_labels.get, ENCODER_FRAME_S, self.ctc_blank_id,
                                                    threads=self._aligner_threads)):
            w.words, w.ctc_log_probs = words, None

    def _align_soon(self, works: list[Work], min_cells: int = 0) -> None:
        """Start aligning the words of each of ``works`` that is a timed final (with a Viterbi table
        of at least ``min_cells`` frames × characters) on the aligner's threads
        (:func:`align_words_soon`, waiting there for the posteriors' copy); :meth:`_align_words`
        collects them. The same words as aligning them later."""
        for w in works:
            if (w.ctc_log_probs is not None and w.words_soon is None
                    and len(w.ctc_log_probs) * len(w.text or w.req.prefix) >= min_cells):
                ready = w.ctc_ready.synchronize if w.ctc_ready is not None else None
                w.words_soon = align_words_soon(w.text or w.req.prefix, w.ctc_log_probs, self._ctc_labels.get,
                                                ENCODER_FRAME_S, self.ctc_blank_id, ready, threads=self._aligner_threads)
                w.ctc_log_probs, w.ctc_ready = None, None

    def _prepare(self, index: int, req: InferenceRequest) -> Work:
        audio = np.ascontiguousarray(np.asarray(req.audio, dtype=np.float32).reshape(-1))
        if audio.shape[0] < self.min_audio_samples:
            audio = np.pad(audio, (0, self.min_audio_samples - audio.shape[0]))
        samples = torch.from_numpy(audio)
        n = int(samples.shape[0])
        w = Work(
            index=index,
            req=req,
            samples=samples,
            n_frames=self.features.num_encoder_frames(n),
            n_tokens=self.features.num_audio_tokens(n),
        )
        w.budget = self.token_budget(req, n)
        return w

    # ------------------------------------------------------------------ encoder / CTC / projector
    def _encode_audio(self, works: list[Work]) -> None:
        encoder = self.model.model.encoder
        if self.encoder_batching == "padded":
            graphs = self.encoder_graphs
            longest = max(w.n_frames for w in works)
            if graphs is not None and graphs.fits(len(works), longest):
                from stream_server.engines.granite.encoder import plan_length_groups

                groups = plan_length_groups([w.n_frames for w in works], graphs.bucket_frames)
                for g, group in enumerate(groups):
                    members = [works[i] for i in group]
                    # Zero-pad the audio to the group's length bucket: features of silence, one replay.
                    frames = graphs.bucket_frames(max(w.n_frames for w in members))
                    # Assembled in numpy: a torch copy per row would release and re-take the GIL per
                    # row, and each re-take can wait a whole switch interval behind the event loop.
                    audio = np.zeros((len(members), graphs.samples_for(frames)), np.float32)
                    for i, w in enumerate(members):
                        audio[i, : w.samples.shape[0]] = w.samples.numpy()
                    feats = self.features.log_mel_stacked(torch.from_numpy(audio).to(self.device, non_blocking=True))
                    hidden = graphs(feats.to(self.dtype))
                    if g < len(groups) - 1:
                        hidden = hidden.clone()  # the graphs' output buffer is reused by the next group
                    self._keep_rows(members, hidden)
                return
            feats = self.features([w.samples for w in works], device=self.device).input_features
            self._keep_rows(works, encoder(feats.to(self.dtype)).last_hidden_state)
            return
        by_length: dict[int, list[Work]] = defaultdict(list)
        for w in works:
            by_length[int(w.samples.shape[0])].append(w)
        for same in by_length.values():
            same_length = torch.stack([w.samples for w in same]).to(self.device)
            feats = self.features.log_mel_stacked(same_length)
            hidden = encoder(feats.to(self.dtype)).last_hidden_state
            for i, w in enumerate(same):
                w.hidden = hidden[i]
                w.hidden_for_projector = hidden[i]

    @staticmethod
    def _keep_rows(works: list[Work], hidden: torch.Tensor) -> None:
        for i, w in enumerate(works):
            w.hidden = hidden[i, : w.n_frames]
            w.hidden_for_projector = hidden[i]
            w.batch_hidden, w.row = hidden, i

    def _project(self, works: list[Work]) -> None:
        """Audio embeddings for every work that has none, in one projector pass.

        The projector (a Q-Former over windows of ``window_size`` encoder frames) treats each
        window independently, so the windows of all requests are stacked into one batch: the same
        numbers as projecting each request's (zero-padded) frames, with one call for any mix of
        lengths, and a fixed shape per window-count bucket that graph replay can serve.
        """
        todo = [w for w in works if w.audio_embeds is None]
        if not todo:
            return
        projector = self.model.model.projector
        size = projector.window_size
        pieces, counts = [], []
        for w in todo:
            blocks = -(-w.n_frames // size)
            if w.hidden_for_projector is None:
                raise RuntimeError("the request has not been encoded")
            frames = w.hidden_for_projector[: blocks * size]
            if frames.shape[0] < blocks * size:
                frames = torch.nn.functional.pad(frames, (0, 0, 0, blocks * size - frames.shape[0]))
            pieces.append(frames.reshape(blocks, size, frames.shape[-1]))
            counts.append(blocks)
        windows = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        graphs = self.projector_graphs
        # A copy out of the graph's static output: one batch can project twice (speculative drafts,
        # then the autoregressive rest), and a replay of the same bucket would overwrite the first
        # call's embeddings while drafts that failed verification still need them.
        out = graphs(windows).clone() if graphs is not None else self.project_windows(windows)
        start = 0
        for w, blocks in zip(todo, counts):
            w.audio_embeds = out[start : start + blocks].reshape(-1, out.shape[-1])[: w.n_tokens]
            start += blocks

    def ctc_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """CTC logits (float32) of encoder hidden states: ``encoder.out(hidden)``."""
        return self.model.model.encoder.out(hidden).float()

    def ctc_greedy(self, features_or_audio: torch.Tensor | np.ndarray) -> str:
        """Greedy CTC transcript of one utterance (encoder cost only).

        Args:
            features_or_audio: raw 16 kHz mono samples (1-D), or stacked features ``(frames, 160)``
                / ``(1, frames, 160)`` as :class:`GraniteFeatureExtractor` makes them.
        """
        if not self.has_ctc:
            raise RuntimeError("this model has no CTC head")
        x = torch.as_tensor(features_or_audio)
        with torch.inference_mode():
            if x.ndim == 1:
                if x.shape[0] < self.min_audio_samples:
                    x = torch.nn.functional.pad(x, (0, self.min_audio_samples - x.shape[0]))
                x = self.features.log_mel_stacked(x.float().unsqueeze(0).to(self.device))
            elif x.ndim == 2:
                x = x.unsqueeze(0)
            hidden = self.model.model.encoder(x.to(self.device, self.dtype)).last_hidden_state[0]
            text, _ = self._ctc_from_hidden(hidden)
        return text

    def _ctc_decode(self, works: list[Work]) -> None:
        """Greedy CTC text and entropy for every work that has none yet, in one batched pass."""
        todo = [w for w in works if w.ctc_text is None]
        by_base: dict[int, list[Work]] = defaultdict(list)
        for w in todo:
            by_base[id(w.batch_hidden)].append(w)
        for group in by_base.values():
            base = group[0].batch_hidden
            longest = max(w.n_frames for w in group)
            if base is not None:
                rows = [w.row for w in group]
                hidden = (base if rows == list(range(len(base))) else base[rows])[:, :longest]
            else:
                hidden = torch.nn.utils.rnn.pad_sequence([w.encoded() for w in group], batch_first=True)
            for w, (text, entropy) in zip(group, self._ctc_rows(hidden, [w.n_frames for w in group])):
                w.ctc_text, w.ctc_entropy = text, entropy

    def _ctc_from_hidden(self, hidden: torch.Tensor) -> tuple[str, float]:
        return self._ctc_rows(hidden.unsqueeze(0), [int(hidden.shape[0])])[0]

    def _ctc_rows(self, hidden: torch.Tensor, lengths: list[int]) -> list[tuple[str, float]]:
        """Greedy CTC of ``(B, T, H)`` encoder states whose row ``i`` has ``lengths[i]`` valid frames.

        One device pass for the batch and one copy to the host (per-request ``.tolist()`` calls
        were a sync each, and CTC partials are most of the server's requests).

        Returns:
            Per row: the collapsed text (blanks removed, whitespace normalised) and the per-frame
            entropy reduced by ``ctc_entropy_reduce`` over the valid frames (``inf`` for no text).
        """
        logp = torch.log_softmax(self.ctc_logits(hidden), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
        ids = logp.argmax(-1)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < torch.tensor(
            lengths, device=hidden.device)[:, None]
        if self.ctc_entropy_reduce == "max":
            reduced = entropy.masked_fill(~valid, -math.inf).amax(-1)
        else:
            reduced = (entropy * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        ids_host = ids.to(torch.int32).cpu().numpy()
        reduced_host = reduced.cpu().numpy()
        table = self._ctc_table
        out = []
        for i, n in enumerate(lengths):
            seq = ids_host[i, :n]
            if n == 0:
                out.append(("", math.inf))
                continue
            keep = np.empty(n, dtype=bool)
            keep[0] = True
            np.not_equal(seq[1:], seq[:-1], out=keep[1:])
            collapsed = seq[keep]
            text = "".join(table[c] if 0 <= c < len(table) else "" for c in collapsed[collapsed != self.ctc_blank_id])
            text = " ".join(text.split())
            out.append((text, float(reduced_host[i])) if text else ("", math.inf))
        return out

    @functools.cached_property
    def _ctc_labels(self) -> dict[str, int]:
        """The CTC class of each character the head can emit (for aligning text to posteriors)."""
        return {char: i for i, char in enumerate(self._ctc_table) if len(char) == 1 and i != self.ctc_blank_id}

    @functools.cached_property
    def _ctc_table(self) -> list[str]:
        return [self._ctc_char(i) for i in range(int(self.model.model.encoder.out.out_features))]

    def _ctc_char(self, i: int) -> str:
        if self.ctc_vocab is None:
            try:
                return chr(i)
            except (ValueError, OverflowError):
                return ""
        return self.ctc_vocab[i] if 0 <= i < len(self.ctc_vocab) else ""

    # ------------------------------------------------------------------ LLM
    def _embed_batch(self, seqs: list[list[int]], audio: list[torch.Tensor]):
        """Left-padded ``inputs_embeds`` with the audio placeholders replaced, plus mask and positions."""
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
        ids = ids.to(self.device)
        mask = mask.to(self.device)
        is_audio = ids == self.audio_token_id
        embed = self.model.get_input_embeddings()
        embeds = embed(torch.where(is_audio, torch.zeros_like(ids), ids))
        feats = torch.cat(audio, dim=0).to(embeds.dtype)
        if int(is_audio.sum()) != feats.shape[0]:
            raise RuntimeError("audio placeholder count does not match the projector outputs")
        embeds[is_audio] = feats
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        return embeds, mask, positions

    def draft(self, work: Work) -> Draft:
        """Speculation stage 1: a final's CTC draft (after :meth:`ctc`), made to start with the request's
        prefix (:func:`_force_prefix`); its tokens are those of the part after the prefix. A benchmark
        subclass may override it (e.g. to cut a random model's junk draft to a realistic length)."""
        draft = work.ctc_text or ""
        prefix = work.req.prefix
        if prefix:
            rest = draft[len(prefix) :] if draft.startswith(prefix) else _force_prefix(prefix, draft)[len(prefix) :]
            return Draft(prefix + rest, tuple(self._encode(rest)) if rest.strip() else ())
        return Draft(draft.strip(), tuple(self._encode(draft.strip())) if draft.strip() else ())

    def verify(self, works: list[Work], drafts: Sequence[Draft]) -> list[Verification]:
        """Speculation stage 2: score each work item's draft in one teacher-forced LLM pass (the
        decoder's prefill with the ``loop``/``graphs`` backends, transformers' forward otherwise).

        The works must be projected (:meth:`project`). Each work keeps the draft's tokens and their
        probabilities (a resumed decode continues after them, word confidences combine them) and gets
        ``info["verify_min_prob"]``; a draft without tokens is rejected unscored. The caller decides
        from the verdicts (:meth:`transcribe_batch` accepts, resumes or decodes); a benchmark subclass
        may override the verdicts (e.g. force a rejection point that random weights never give).
        """
        if len(works) != len(drafts):
            raise ValueError("one draft per work item")
        for w, d in zip(works, drafts):
            w.draft_ids = list(d.token_ids)
        verdicts = [Verification((), None, 0, False)] * len(works)
        rows = [i for i, d in enumerate(drafts) if d.token_ids]
        if not rows:
            return verdicts
        seqs = [self._sequence(works[i], drafts[i].token_ids) for i in rows]
        embeds, mask, positions = self._embed_batch(seqs, [works[i].embeds() for i in rows])
        self._adapter_on()
        if self._fast_verify:
            # One prefill pass of the engine's decoder (a graph replay on CUDA): transformers' eager
            # forward is launch-bound at this size (~26 ms on an H100/H200 for a 172-token prompt,
            # against ~5 ms replayed, docs/granite_gpu.md), and its time follows the host CPU.
            hidden = self.decoder.hidden_states(embeds, mask, pad_token_id=self.pad_id, eos_token_ids=self.eos_ids)
        else:
            hidden = self.model.model.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        length = embeds.shape[1]
        b_idx, p_idx, tok = [], [], []
        for r, i in enumerate(rows):
            n = len(drafts[i].token_ids)
            first = length - n  # position of the first draft token (left padding puts sequences at the end)
            for k in range(n):
                b_idx.append(r)
                p_idx.append(first + k - 1)
                tok.append(drafts[i].token_ids[k])
        gathered = hidden[torch.tensor(b_idx, device=self.device), torch.tensor(p_idx, device=self.device)]
        logits = self.model.lm_head(gathered).float() / self.logits_scaling
        probs = torch.softmax(logits, dim=-1)
        tok_t = torch.tensor(tok, device=self.device)
        token_probs = probs[torch.arange(len(tok), device=self.device), tok_t]
        is_argmax = probs.argmax(-1) == tok_t
        start = 0
        for i in rows:
            n = len(drafts[i].token_ids)
            p = token_probs[start : start + n]
            works[i].info["verify_min_prob"] = float(p.min())
            works[i].draft_probs = p.tolist()
            passed = (p >= self.verify_threshold).int()
            verdicts[i] = Verification(
                token_probs=tuple(works[i].draft_probs),
                is_argmax=is_argmax[start : start + n],
                passed_prefix=int(passed.cumprod(0).sum()),
                accepted=bool((p >= self.verify_threshold).all()),
            )
            start += n
        return verdicts

    @property
    def _fast_verify(self) -> bool:
        """Score drafts with the decoder's prefill (loop/graphs backends, plain greedy, no LoRA)."""
        return (self.decode_backend in ("loop", "graphs") and not self.generate_kwargs
                and not getattr(self.model, "_hf_peft_config_loaded", False))

    @property
    def encoder_graphs(self):
        """The :class:`~stream_server.engines.granite.encoder.EncoderGraphs` of ``encoder_backend="graphs"``, else None."""
        if self._encoder_graphs is None and self.encoder_backend == "graphs":
            from stream_server.engines.granite.encoder import EncoderGraphs

            self._encoder_graphs = EncoderGraphs(self.model.model.encoder, max_batch=self.max_batch)
        return self._encoder_graphs

    @property
    def projector_graphs(self):
        """Graph replay of :meth:`project_windows` per window-count bucket (with the encoder graphs), else None."""
        if self._projector_graphs is None and self.encoder_backend == "graphs":
            from stream_server.engines.granite.encoder import WindowGraphs

            projector = self.model.model.projector
            self._projector_graphs = WindowGraphs(
                self.project_windows, (projector.window_size, int(self.config.encoder_config.hidden_dim)),
                device=self.device, dtype=self.dtype, max_windows=self.max_batch * 80)
        return self._projector_graphs

    @property
    def decoder(self):
        """The :class:`~stream_server.engines.granite.decode.StaticGreedyDecoder` of the ``loop``/``graphs`` backends."""
        if self._decoder is None:
            from stream_server.engines.granite.decode import StaticGreedyDecoder

            options = dict(self.decode_options)
            if int(options.get("max_graphs", 8)) == 0:
                options["max_graphs"] = self.decode_states_for_free_memory()
            self._decoder = StaticGreedyDecoder(
                self.model, use_graphs=self.decode_backend == "graphs", **options
            )
        return self._decoder

    def decode_states_for_free_memory(self) -> int:
        """Decode states (``max_graphs``) that half the device's free memory holds, 8 to 64 (8 off CUDA).

        Sized for the largest state traffic needs: the batch bucket of ``max_batch`` with the KV
        capacity of the longest ``warm_decode_seconds`` utterance (prompt, audio tokens and budget).
        """
        from stream_server.engines.granite.decode import batch_bucket, capacity_bucket, decode_states_for_memory

        if self.device.type != "cuda":
            return 8
        free, _ = torch.cuda.mem_get_info(self.device)
        text = self.config.text_config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        seconds = max(self.warm_decode_seconds or (12.0,))
        samples = int(seconds * SAMPLE_RATE)
        rate = max([self.tokens_per_second, *self.tokens_per_second_by_language.values()])
        prompt = self.features.num_audio_tokens(samples) + 64  # + the instruction and chat template
        capacity = capacity_bucket(prompt + math.ceil(seconds * rate) + self.extra_new_tokens)
        rows = batch_bucket(self.max_batch)
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        kv = 2 * int(text.num_hidden_layers) * rows * int(text.num_key_value_heads) * capacity * head_dim * itemsize
        prefill = rows * prompt * (int(text.hidden_size) + prompt) * itemsize  # embeddings + additive mask
        return decode_states_for_memory(free, kv + prefill)

    def _generate(self, works: list[Work]) -> None:
        seqs = [self._sequence(w) for w in works]
        embeds, mask, _ = self._embed_batch(seqs, [w.embeds() for w in works])
        max_new = max(self._budget_left(w) for w in works)
        forced = self.forced_lengths
        self._adapter_on()
        if self.decode_backend in ("loop", "graphs") and not self.generate_kwargs:
            out, probs = self.decoder.generate_with_probs(
                embeds, mask, max_new, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id, suppress_eos=forced,
            )
        else:
            out, probs = self._hf_generate_with_probs(embeds, mask, max_new, forced)
        self._finish(works, out, forced, probs)

    def _hf_generate(self, embeds: torch.Tensor, mask: torch.Tensor, max_new: int, forced: bool) -> torch.Tensor:
        return self._hf_generate_with_probs(embeds, mask, max_new, forced)[0]

    def _hf_generate_with_probs(self, embeds: torch.Tensor, mask: torch.Tensor, max_new: int,
                                forced: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """transformers' greedy ``generate``: the token ids and each one's probability (from the scores
        ``generate`` computed anyway; ``None`` when a ``generate_kwargs`` search gives none)."""
        from transformers import GenerationConfig
        from transformers.generation import GenerationMixin

        # Everything that shapes the search is set explicitly: transformers fills unset (None)
        # fields from the checkpoint's generation_config.json.
        settings: dict[str, Any] = dict(
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            use_cache=True,
        )  # no min_length: min_new_tokens (below) decides, and setting both logs a warning per call
        settings.update(self.generate_kwargs)
        settings.update(
            return_dict_in_generate=True,
            output_scores=True,
            max_new_tokens=max_new,
            min_new_tokens=max_new if forced else 0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        gen_config = GenerationConfig(**settings)
        # GenerationMixin.generate directly: the model's own override would switch a LoRA adapter
        # off because the audio arrives as inputs_embeds rather than input_features.
        out = GenerationMixin.generate(
            self.model, inputs_embeds=embeds, attention_mask=mask, generation_config=gen_config
        )
        if isinstance(out, torch.Tensor):  # a GenerateOutput is asked for (return_dict_in_generate)
            raise TypeError("generate returned bare token ids, not a GenerateOutput")
        ids: torch.Tensor = out.sequences
        if ids.shape[1] > max_new:  # some versions return the (empty) prompt ids in front
            ids = ids[:, -max_new:]
        scores = getattr(out, "scores", None)
        if not scores or len(scores) != ids.shape[1] or self.generate_kwargs.get("num_beams", 1) != 1:
            return ids, None
        # Greedy: each step's processed scores (EOS suppression included) are what the token was picked
        # from. transformers' GraniteSpeech returns lm_head's output unscaled; the probabilities here are
        # those of the verification pass and the engine's own decoder: softmax(lm_head / logits_scaling).
        logp = torch.log_softmax(torch.stack(scores, dim=1).float() / self.logits_scaling, dim=-1)
        probs = logp.gather(-1, ids[:, :, None].to(logp.device)).squeeze(-1).exp()
        return ids.cpu(), probs.cpu()

    def _adapter_on(self) -> None:
        """Switch a loaded LoRA adapter on: every LLM pass here has audio in its prompt, and
        transformers' ``generate`` enables the adapter whenever audio features are given."""
        if getattr(self.model, "_hf_peft_config_loaded", False):
            self.model.enable_adapters()

    @staticmethod
    def _budget_left(w: Work) -> int:
        """New tokens the decode may still produce (a resumed decode has spent some on the draft)."""
        return max(1, w.budget - len(w.resume_ids))

    def _finish(self, works: list[Work], out: torch.Tensor, forced: bool, probs: torch.Tensor | None = None) -> None:
        eos = set(self.eos_ids)
        prob_rows = probs.tolist() if probs is not None else [None] * len(works)
        for w, row, row_probs in zip(works, out.tolist(), prob_rows):
            budget = self._budget_left(w)
            tokens = row[:budget]
            ended = forced
            if not forced:
                for k, t in enumerate(tokens):
                    if t in eos:
                        tokens = tokens[:k]
                        ended = True
                        break
            # The decoder stops early only once every row has ended, so a row without EOS ran to its budget.
            w.truncated = not ended and len(tokens) == budget
            answer = w.resume_ids + tokens
            if row_probs is not None and len(w.draft_probs) >= len(w.resume_ids):
                w.token_ids = answer
                w.token_probs = w.draft_probs[: len(w.resume_ids)] + row_probs[: len(tokens)]
            cont = self._continuation(self._prefix_ids(w), answer)
            if self.repetition_guard and not forced and looks_repetitive(cont):
                cont = collapse_repeats(cont)
                w.info["repetition_collapsed"] = True
                w.token_ids, w.token_probs = [], []  # the text is no longer the tokens
                if w.req.kind == "final":
                    self._stats["repetition_loops"] += 1
            if w.truncated and w.req.kind == "final":
                self._stats["truncated"] += 1
            prefix = w.req.prefix
            w.text = prefix + cont.rstrip() if prefix else cont.strip()
            w.info["new_tokens"] = len(tokens)
            if w.resume_ids:
                w.info["resumed_tokens"] = len(w.resume_ids)
            self.on_decoded(w, answer)
            # A long final's Viterbi (without the GIL) overlaps the other rows' detokenising here
            # and the results' token spans (_result).
            self._align_soon([w], min_cells=ALIGN_SOON_CELLS)

    def _token_spans(self, text: str, ids: list[int], probs: list[float]) -> list[tuple[int, int, float]]:
        """Where each token's characters sit in ``text`` (which ends with the tokens' decoded text,
        stripped): ``(start, end, probability)``; empty when they cannot be placed."""
        pieces = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
        full = "".join(pieces)
        tail = full.strip()
        if not tail or not text.endswith(tail) or full != self.tokenizer.decode(ids, skip_special_tokens=True):
            return []  # e.g. a multi-byte character split across tokens: the pieces do not add up
        offset = len(text) - len(tail) - (len(full) - len(full.lstrip()))
        spans, position = [], 0
        for piece, prob in zip(pieces, probs):
            spans.append((offset + position, offset + position + len(piece), float(prob)))
            position += len(piece)
        return spans

    def _prefix_ids(self, w: Work) -> list[int]:
        if w.prefix_ids is None:
            w.prefix_ids = self._encode(w.req.prefix) if w.req.prefix else []
        return w.prefix_ids

    def _continuation(self, prefix_ids: list[int], tokens: list[int]) -> str:
        decode = self.tokenizer.decode
        if not prefix_ids:
            return decode(tokens, skip_special_tokens=True)
        head = decode(prefix_ids, skip_special_tokens=True)
        full = decode(list(prefix_ids) + list(tokens), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head) :]
        return decode(tokens, skip_special_tokens=True)


def _force_prefix(prefix: str, text: str) -> str:
    """Make a CTC hypothesis start with ``prefix`` (which the CTC pass cannot be forced to produce).

    If ``text`` already starts with it, ``text`` is returned. Otherwise the words of ``text``
    aligned with the prefix's words (by count) are replaced by the prefix; when the prefix ends
    in the middle of a word and the aligned CTC word extends it, the rest of that word is kept.
    """
    if not prefix or text.startswith(prefix):
        return text
    p_words = prefix.split()
    t_words = text.split()
    if not p_words:
        return prefix + text.lstrip()
    k = len(p_words)
    tail_words = t_words[k:]
    if prefix[-1].isspace():
        return prefix + " ".join(tail_words)
    partial = p_words[-1]
    aligned = t_words[k - 1] if len(t_words) >= k else ""
    glue = aligned[len(partial) :] if aligned.startswith(partial) and len(aligned) > len(partial) else ""
    rest = " ".join(tail_words)
    return prefix + glue + (" " + rest if rest else "")
