"""Partial-hypothesis stabilizer (LocalAgreement-n over enough audio).

Each partial decode of a growing utterance yields a new hypothesis. A word becomes *stable* once
consecutive hypotheses agree on it and on every word before it: at least ``agreement`` (default 3)
of them, each over at least ``min_audio_s`` of audio (2 s), together spanning at least
``min_span_s`` of it (3 s). Stable words are published as ``stable_text`` and never retracted for
the rest of the utterance. The newest hypothesis's last word is never made stable: it may be a
word cut off by the end of the audio decoded so far. A hypothesis (or the final) that disagrees
with the stable words is reconciled with them (:func:`reconcile`).
"""

from __future__ import annotations

import unicodedata


def _comparable(word: str) -> str:
    """Case- and punctuation-insensitive form, so "them," and "them." agree."""
    kept = [ch for ch in unicodedata.normalize("NFKC", word).casefold() if unicodedata.category(ch)[0] in "LNM"]
    return "".join(kept) or word


# Word edits between the stable words and the start of a hypothesis, as in word error rate, with
# hair-thin differences that decide between edit scripts of the same length (see reconcile).
_SKIPPED = 1.001  # a word of the hypothesis that the stable words skipped
_CHANGED = 1.002  # a stable word standing for a different word of the hypothesis
_EXTRA = 1.003  # a stable word with no counterpart in the hypothesis


def reconcile(stable: list[str], words: list[str]) -> int:
    """How many leading words of ``words`` the published ``stable`` words stand for.

    The text to publish is ``stable + words[j:]``. ``j`` is where the best word alignment of
    ``stable`` against a prefix of ``words`` ends (fewest word edits, case and punctuation aside),
    so every word of ``words`` after the part the stable words cover is kept, wherever in
    ``words`` that part ends: "here are the" + "here are some more words" gives "here are the more
    words", not a jump to a later "the". Between equally short alignments, one where the stable
    words skipped a word of ``words`` beats one where a stable word stands for another word, which
    beats one where a stable word stands for nothing: published words are never repeated when the
    hypothesis can explain them ("Mr. John" + "And so Mr. John Dashwood" gives "Mr. John
    Dashwood", not "Mr. John Mr. John Dashwood"). Both texts decode the same audio from its start,
    so a remaining tie goes to the ``j`` closest to ``len(stable)`` ("go forward" + "for ward ten
    metres" gives "go forward ten metres").
    """
    a = [_comparable(w) for w in stable]
    b = [_comparable(w) for w in words]
    # row[j]: cost of aligning the stable words seen so far with words[:j].
    row = [j * _SKIPPED for j in range(len(b) + 1)]
    for i, word in enumerate(a, 1):
        prev, row = row, [i * _EXTRA]
        for j in range(1, len(b) + 1):
            row.append(min(prev[j] + _EXTRA, row[j - 1] + _SKIPPED,
                           prev[j - 1] + (0.0 if word == b[j - 1] else _CHANGED)))
    best = min(row)
    return min((j for j, cost in enumerate(row) if cost <= best + 1e-9), key=lambda j: (abs(j - len(a)), j))


def _gains_punctuation(word: str, longer: str) -> bool:
    """Whether ``longer`` is ``word`` followed by punctuation only ("3" and "3.")."""
    rest = longer[len(word):]
    return bool(rest) and longer.startswith(word) and all(unicodedata.category(ch)[0] == "P" for ch in rest)


def extends(before: str, after: str) -> bool:
    """Whether ``after`` keeps the published stable text ``before``: the same words in the same
    order at its start, except that the last may have gained trailing punctuation ("dial 3" is
    extended by "dial 3. To send", which is what the final says once it hears the sentence end).
    ``after`` then also starts with ``before`` as a string, which is how the protocol states it."""
    old, new = before.split(), after.split()
    if not old:
        return True
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return False
    return new[len(old) - 1] == old[-1] or _gains_punctuation(old[-1], new[len(old) - 1])


def drop_repeated_lead(before: str, text: str, most: int = 12) -> str:
    """``text`` without the leading words that repeat the end of ``before`` (case and punctuation
    aside): the longest such run of at most ``most`` words.

    For a piece that continues an utterance cut at ``max_utterance_s``: the cut is placed at the
    quietest frame of the last seconds, behind the audio the partials had already decoded, so the
    piece before it may have published (as stable words) what was said just after the cut, and
    this piece, decoded from the cut with that text as its prompt, says it again ("…to increase
    the" + "to increase the audio volume…"). A real repetition across a cut is lost with it, which
    is much rarer than the echo.
    """
    tail = [_comparable(w) for w in before.split()[-most:]]
    words = text.split()
    head = [_comparable(w) for w in words[:most]]
    for k in range(min(len(tail), len(head)), 0, -1):
        if tail[-k:] == head[:k]:
            return " ".join(words[k:])
    return text


class PartialStabilizer:
    """Tracks one utterance's stable prefix.

    Invariant: every ``stable_text`` is extended by the next one and by every text returned by
    :meth:`update` or :meth:`finish` (:func:`extends`: its words, in order, of which only the last may
    gain trailing punctuation, so each also starts with it as a string).
    """

    DEFAULT_MIN_SPAN_S = 3.0
    """``min_span_s``'s default (also the ``stable_agreement_s`` setting's)."""

    def __init__(self, agreement: int = 3, holdback: int = 1, min_audio_s: float = 2.0,
                 min_span_s: float = DEFAULT_MIN_SPAN_S) -> None:
        """
        Args:
            agreement: how many consecutive hypotheses must agree on a word (LocalAgreement-n). 3 by
                default: on 40 asterisk-en dev clips with every partial decoded, streaming WER was
                4.1 % with 2 and 3.4 % with 3 (1.4 % with partials off): early partials mishear the
                first words, and two of them agreeing is not evidence enough.
            holdback: how many trailing words of the newest hypothesis are never made stable.
            min_audio_s: hypotheses over less audio than this never make words stable (recognisers
                guess wildly on the first fraction of a second).
            min_span_s: the agreeing hypotheses must also span this much audio (the newest covers
                at least this much more than the oldest); when ``agreement`` consecutive ones span
                less, older ones must agree too. Without it, how much evidence a stable word needs
                depends on the partial cadence: every 0.5 s at one stream, three hypotheses span
                only 1 s, and more partials lock in more early guesses. 3 s, not 1.5: Whisper
                tiny.en says some words wrongly for seconds and right only with more audio after
                them ("read" for "reach" over 3.5-5 s), or leaves out an utterance's first word
                until about 4 s of it ("And Mr. John"); over 1.5 s of agreement those became stable
                and the final lost the right word (docs/benchmarks.md, issue #16, eighth session).
        """
        if agreement < 2 or holdback < 0 or min_span_s < 0:
            raise ValueError("agreement must be >= 2, holdback and min_span_s >= 0")
        self.agreement = agreement
        self.holdback = holdback
        self.min_audio_s = min_audio_s
        self.min_span_s = min_span_s
        self.stable_words: list[str] = []
        self._history: list[tuple[list[str], float | None]] = []  # (words, audio_s), oldest first
        self.revisions = 0
        """How often a hypothesis contradicted the stable prefix (it was overridden, not retracted)."""

    @property
    def stable_text(self) -> str:
        return " ".join(self.stable_words)

    def _enforce_prefix(self, text: str) -> list[str]:
        """The stable words followed by what ``text`` says after them.

        When ``text`` disagrees with the stable words, the published words stand and ``text`` is
        reconciled with them (:func:`reconcile`): they replace the part of ``text`` they align with,
        and no word of ``text`` after that part is lost ("Do we set your" + "To reset your speaking
        volume" gives "Do we set your speaking volume", not a repeat or a gap).
        """
        words = text.split()
        n = len(self.stable_words)
        if self.agrees(text):
            covered = n
        else:
            self.revisions += 1
            covered = reconcile(self.stable_words, words)
        head = self.stable_words
        if n and covered and _gains_punctuation(head[-1], words[covered - 1]):
            # The last stable word, as the text says it with the punctuation after it: partials
            # over a sentence still running on said "dial 3", the final says "dial 3. To send".
            # A string extension, so the published text stands (see :func:`extends`).
            head = head[:-1] + [words[covered - 1]]
        return head + words[covered:]

    def update(self, hypothesis: str, audio_s: float | None = None) -> tuple[str, str]:
        """Take a new partial hypothesis.

        Args:
            hypothesis: the engine's full text for the utterance so far.
            audio_s: seconds of audio the hypothesis covers (``None``: long enough).

        Returns:
            ``(text, stable_text)`` to publish; ``stable_text`` is a prefix of ``text``.
        """
        words = self._enforce_prefix(hypothesis)
        if audio_s is not None and audio_s < self.min_audio_s:
            return " ".join(words), self.stable_text
        self._history = (self._history + [(words, audio_s)])[-self._HISTORY :]
        window = self._agreeing_window()
        if window:
            limit = min(len(words) - self.holdback, *(len(h) for h in window[:-1]))
            agreed = len(self.stable_words)
            while agreed < limit and len({_comparable(h[agreed]) for h in window}) == 1:
                agreed += 1
            self.stable_words = words[: max(agreed, len(self.stable_words))]
        return " ".join(words), self.stable_text

    _HISTORY = 64  # hypotheses kept: more than a longest utterance's span ever needs

    def _agreeing_window(self) -> list[list[str]] | None:
        """The newest hypotheses that must all agree on a word for it to become stable (oldest
        first), or ``None`` while there are too few: at least ``agreement`` of them, spanning at
        least ``min_span_s`` of audio."""
        if len(self._history) < self.agreement:
            return None
        newest = self._history[-1][1]
        count = self.agreement
        if self.min_span_s > 0 and newest is not None:
            while True:
                oldest = self._history[-count][1]
                if oldest is None or newest - oldest >= self.min_span_s - 1e-9:
                    break
                if count == len(self._history):
                    return None
                count += 1
        return [words for words, _ in self._history[-count:]]

    def agrees(self, text: str) -> bool:
        """Whether ``text`` starts with the stable words (case and punctuation aside)."""
        words = text.split()
        n = len(self.stable_words)
        return len(words) >= n and [_comparable(w) for w in words[:n]] == [_comparable(w) for w in self.stable_words]

    def finish(self, final_text: str) -> str:
        """The final text of the utterance, guaranteed to start with the published stable text."""
        return " ".join(self._enforce_prefix(final_text))
