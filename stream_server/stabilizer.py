"""Partial-hypothesis stabilizer (LocalAgreement-2).

Each partial decode of a growing utterance yields a new hypothesis. A word becomes *stable* once two
consecutive hypotheses agree on it and on every word before it; stable words are published as
``stable_text`` and never retracted for the rest of the utterance. The newest hypothesis's last
word is never made stable: it may be a word cut off by the end of the audio decoded so far.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self.stable_words: list[str] = []
        self._previous: list[str] | None = None
        self.revisions = 0
        """How often a hypothesis contradicted the stable prefix (it was overridden, not retracted)."""

    @property
    def stable_text(self) -> str:
        return " ".join(self.stable_words)

    def _enforce_prefix(self, text: str) -> list[str]:
        words = text.split()
        n = len(self.stable_words)
        if not self.agrees(text):
            self.revisions += 1
        # The engine was asked to continue the stable prefix; whatever it said in that span, the
        # published words stand and only the continuation is taken from the hypothesis.
        return self.stable_words + words[n:]

    def update(self, hypothesis: str) -> tuple[str, str]:
        """Take a new partial hypothesis.

        Args:
            hypothesis: the engine's full text for the utterance so far.

        Returns:
            ``(text, stable_text)`` to publish; ``stable_text`` is a prefix of ``text``.
        """
        words = self._enforce_prefix(hypothesis)
        if self._previous is not None:
            limit = min(len(words) - 1, len(self._previous))
            agreed = len(self.stable_words)
            while agreed < limit and _comparable(words[agreed]) == _comparable(self._previous[agreed]):
                agreed += 1
            self.stable_words = words[:agreed]
        self._previous = words
        return " ".join(words), self.stable_text

    def agrees(self, text: str) -> bool:
        """Whether ``text`` starts with the stable words (case and punctuation aside)."""
        words = text.split()
        n = len(self.stable_words)
        return len(words) >= n and [_comparable(w) for w in words[:n]] == [_comparable(w) for w in self.stable_words]

    def finish(self, final_text: str) -> str:
        """The final text of the utterance, guaranteed to start with the published stable text."""
        return " ".join(self._enforce_prefix(final_text))
