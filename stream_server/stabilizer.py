"""Partial-hypothesis stabilizer (LocalAgreement-2).

Each partial decode of a growing utterance yields a new hypothesis. A word becomes *stable* once
``agreement`` (default 3) consecutive hypotheses agree on it and on every word before it; stable
words are published as ``stable_text`` and never retracted for the rest of the utterance. The newest hypothesis's last
word is never made stable: it may be a word cut off by the end of the audio decoded so far.
"""

from __future__ import annotations

import difflib
import unicodedata


def _comparable(word: str) -> str:
    """Case- and punctuation-insensitive form, so "them," and "them." agree."""
    kept = [ch for ch in unicodedata.normalize("NFKC", word).casefold() if unicodedata.category(ch)[0] in "LNM"]
    return "".join(kept) or word


class PartialStabilizer:
    """Tracks one utterance's stable prefix.

    Invariant: ``stable_words`` only grows, and every text returned by :meth:`update` or
    :meth:`finish` starts with ``" ".join(stable_words)``.
    """

    def __init__(self, agreement: int = 3, holdback: int = 1, min_audio_s: float = 0.0) -> None:
        """
        Args:
            agreement: how many consecutive hypotheses must agree on a word (LocalAgreement-n). 3 by
                default: on 40 asterisk-en dev clips with every partial decoded, streaming WER was
                4.1 % with 2 and 3.4 % with 3 (1.4 % with partials off): early partials mishear the
                first words, and two of them agreeing is not evidence enough.
            holdback: how many trailing words of the newest hypothesis are never made stable.
            min_audio_s: hypotheses over less audio than this never make words stable (recognisers
                guess wildly on the first fraction of a second).
        """
        if agreement < 2 or holdback < 0:
            raise ValueError("agreement must be >= 2 and holdback >= 0")
        self.agreement = agreement
        self.holdback = holdback
        self.min_audio_s = min_audio_s
        self.stable_words: list[str] = []
        self._history: list[list[str]] = []
        self.revisions = 0
        """How often a hypothesis contradicted the stable prefix (it was overridden, not retracted)."""

    @property
    def stable_text(self) -> str:
        return " ".join(self.stable_words)

    def _enforce_prefix(self, text: str) -> list[str]:
        """The stable words followed by what ``text`` says after them.

        When ``text`` disagrees with the stable words, the published words stand; the continuation
        starts where the stable prefix's last aligned word falls in ``text`` (so "Do we set your"
        + "To reset your speaking volume" gives "Do we set your speaking volume", not a repeat or
        a gap).
        """
        words = text.split()
        n = len(self.stable_words)
        if self.agrees(text):
            return self.stable_words + words[n:]
        self.revisions += 1
        stable = [_comparable(w) for w in self.stable_words]
        hypothesis = [_comparable(w) for w in words]
        end = n  # no word in common: fall back to position
        blocks = [b for b in difflib.SequenceMatcher(a=stable, b=hypothesis, autojunk=False).get_matching_blocks()
                  if b.size and b.a < n]
        if blocks:
            last = blocks[-1]
            matched_a = last.a + min(last.size, n - last.a)
            # Stable words after the last match stand for as many hypothesis words (substitutions).
            end = min(len(words), last.b + (matched_a - last.a) + (n - matched_a))
        return self.stable_words + words[end:]

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
        self._history = (self._history + [words])[-self.agreement :]
        if len(self._history) == self.agreement:
            limit = min(len(words) - self.holdback, *(len(h) for h in self._history[:-1]))
            agreed = len(self.stable_words)
            while agreed < limit and len({_comparable(h[agreed]) for h in self._history}) == 1:
                agreed += 1
            self.stable_words = words[: max(agreed, len(self.stable_words))]
        return " ".join(words), self.stable_text

    def agrees(self, text: str) -> bool:
        """Whether ``text`` starts with the stable words (case and punctuation aside)."""
        words = text.split()
        n = len(self.stable_words)
        return len(words) >= n and [_comparable(w) for w in words[:n]] == [_comparable(w) for w in self.stable_words]

    def finish(self, final_text: str) -> str:
        """The final text of the utterance, guaranteed to start with the published stable text."""
        return " ".join(self._enforce_prefix(final_text))
