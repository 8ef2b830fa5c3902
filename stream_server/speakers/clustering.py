"""Online speaker clustering and the per-session speaker tracker (pure: numpy only, no I/O, no clock).

Speakers are numbered 0, 1, 2, … in order of first appearance. A label once published always means
the same speaker: clusters are never renumbered; when two clusters turn out to be one voice (their
centroids meet), the newer one is folded into the older and later utterances get the older label.

Embeddings and centroids live in this object only, for the session's lifetime: nothing here logs,
serialises or exposes them (``repr`` shows counts only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from stream_server.speakers.encoder import SpeakerEmbeddings


@dataclass(frozen=True)
class SpeakerSettings:
    """Server-side settings of speaker labelling (``serve --diarize-*``).

    Attributes:
        threshold: cosine similarity to the nearest speaker centroid below which an utterance (or a
            segment of one) starts a new speaker.
        max_speakers: at most this many labels per session; past it, the nearest speaker is used.
        merge_threshold: two centroids at least this similar are one speaker: the newer label is
            retired and its utterances' successors get the older one.
        min_new_speaker_s: audio shorter than this never starts a new speaker (its embedding is too
            noisy); it goes to the nearest existing one.
        change_threshold: inside one utterance, two adjacent stretches whose mean embeddings are
            less similar than this are different speakers (``speaker_turns``).
        min_turn_windows: a stretch inside an utterance needs at least this many 1.6 s windows
            (about 1.5 s of its own audio at 1.3 windows per second) to count as a turn.
        pause_change_threshold: the same as ``change_threshold`` for a cut at a pause inside the
            utterance (where the encoder windowed each side on its own, see
            :func:`~stream_server.speakers.encoder.pause_pieces`): there one window a side is
            enough, and the threshold is higher, a pause being where turns change.
        preload: the server loads the speaker encoder at startup (torch and the weights: about 0.8 s
            and 200 MB, paid by every start) instead of when the first diarizing session asks
            (whose first final then may wait for the load, once per process). Read by the engine
            wrapper (:class:`~stream_server.speakers.engine.SpeakerEmbeddingEngine`), not the tracker.
    """

    threshold: float = 0.84
    max_speakers: int = 8
    merge_threshold: float = 0.90
    min_new_speaker_s: float = 1.0
    change_threshold: float = 0.75
    min_turn_windows: int = 2
    pause_change_threshold: float = 0.88
    preload: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        for name in ("threshold", "merge_threshold", "change_threshold", "pause_change_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a cosine similarity in [-1, 1]")
        if self.max_speakers < 1:
            raise ValueError("max_speakers must be >= 1")
        if self.min_new_speaker_s < 0:
            raise ValueError("min_new_speaker_s must be >= 0")
        if self.min_turn_windows < 1:
            raise ValueError("min_turn_windows must be >= 1")


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class OnlineClusterer:
    """Cosine clustering of a stream of embeddings against running speaker centroids.

    A centroid is the duration-weighted sum of the unit embeddings assigned to it; similarity is
    taken to its direction.
    """

    def __init__(self, settings: SpeakerSettings = SpeakerSettings()):
        settings.validate()
        self.settings = settings
        self._sums: list[np.ndarray] = []  # per label; a retired label keeps its slot
        self._alias: list[int] = []  # label -> the label it was folded into (itself while live)

    def __repr__(self) -> str:
        return f"OnlineClusterer(speakers={self.speakers})"

    @property
    def speakers(self) -> int:
        """Labels handed out so far (retired ones included: they were published)."""
        return len(self._sums)

    def _live(self) -> list[int]:
        return [i for i, a in enumerate(self._alias) if a == i]

    def similarities(self, embedding: np.ndarray) -> dict[int, float]:
        """Cosine similarity of ``embedding`` to each live speaker's centroid."""
        return {i: float(_unit(self._sums[i]) @ embedding) for i in self._live()}

    def nearest(self, embedding: np.ndarray) -> tuple[int | None, float]:
        """The live speaker closest to ``embedding`` and the similarity (``(None, -1)`` when none)."""
        sims = self.similarities(embedding)
        if not sims:
            return None, -1.0
        best = max(sims, key=sims.__getitem__)
        return best, sims[best]

    def assign(self, embedding: np.ndarray, seconds: float = 1.0) -> int:
        """Label one embedding and fold it into that speaker's centroid.

        Args:
            embedding: a unit vector.
            seconds: how much audio it stands for (its weight in the centroid; short audio never
                starts a new speaker, see :attr:`SpeakerSettings.min_new_speaker_s`).

        Returns:
            The speaker label.
        """
        embedding = _unit(np.asarray(embedding, dtype=np.float64))
        best, similarity = self.nearest(embedding)
        s = self.settings
        if best is None or (
            similarity < s.threshold and len(self._live()) < s.max_speakers and seconds >= s.min_new_speaker_s
        ):
            self._sums.append(embedding * seconds)
            self._alias.append(len(self._alias))
            return len(self._sums) - 1
        self._sums[best] = self._sums[best] + embedding * seconds
        return self._merge(best)

    def _merge(self, label: int) -> int:
        # Fold the cluster that just moved into an older one it now coincides with (or an older one
        # into it); the surviving label is the older, so a retired label is never reused.
        centroid = _unit(self._sums[label])
        for other in self._live():
            if other == label:
                continue
            if float(_unit(self._sums[other]) @ centroid) >= self.settings.merge_threshold:
                keep, drop = min(label, other), max(label, other)
                self._sums[keep] = self._sums[keep] + self._sums[drop]
                for i, a in enumerate(self._alias):
                    if a == drop:
                        self._alias[i] = keep
                return keep
        return label


@dataclass(frozen=True)
class SpeakerTurn:
    """A stretch of an utterance attributed to one speaker; times in seconds on the stream's clock."""

    speaker: int
    start: float
    end: float

    def to_wire(self) -> dict:
        return {"speaker": self.speaker, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass(frozen=True)
class Attribution:
    """Who spoke an utterance.

    Attributes:
        speaker: the speaker of most of its audio.
        turns: the stretches by speaker, in time order, adjacent ones of one speaker joined; more than
            one only when the speaker changes inside the utterance.
    """

    speaker: int
    turns: tuple[SpeakerTurn, ...] = field(default=())

    @property
    def changes(self) -> bool:
        return len({t.speaker for t in self.turns}) > 1

    def speaker_at(self, start: float, end: float) -> int:
        """The speaker of the stretch ``[start, end)`` (e.g. a word): the turn overlapping it most,
        or the nearest turn when none overlaps; the utterance's speaker when there are no turns."""
        if not self.turns:
            return self.speaker
        overlap = [max(0.0, min(end, t.end) - max(start, t.start)) for t in self.turns]
        if max(overlap) > 0:
            return self.turns[int(np.argmax(overlap))].speaker
        middle = (start + end) / 2
        return min(self.turns, key=lambda t: min(abs(middle - t.start), abs(middle - t.end))).speaker

    def label_words(self, words: Sequence[dict]) -> list[dict]:
        """Copies of word dicts (``start``/``end`` in stream seconds) with ``speaker`` set: the per-word
        hook for finals that carry words."""
        return [{**w, "speaker": self.speaker_at(float(w["start"]), float(w["end"]))} for w in words]


class SpeakerTracker:
    """One session's speakers: turns the embeddings of each final, in utterance order, into labels.

    Call :meth:`attribute` for finals in the order they are published: labels are handed out in
    order of first appearance.
    """

    def __init__(self, settings: SpeakerSettings = SpeakerSettings()):
        self.clusterer = OnlineClusterer(settings)
        self.settings = settings

    def __repr__(self) -> str:
        return f"SpeakerTracker(speakers={self.clusterer.speakers})"

    def attribute(self, embeddings: SpeakerEmbeddings, start: float, end: float) -> Attribution:
        """Label an utterance spanning ``[start, end)`` seconds of the stream.

        The utterance is cut where the mean embeddings of the windows on either side of a point are
        less similar than ``change_threshold`` (each side at least ``min_turn_windows`` windows; the
        deepest such cut first, then recursively); each stretch is clustered on its own mean.
        """
        duration = max(end - start, 0.0)
        groups = self._segment(embeddings.partials, embeddings.pieces)
        if len(groups) == 1:
            label = self.clusterer.assign(embeddings.utterance, duration)
            return Attribution(label, (SpeakerTurn(label, start, end),))
        turns: list[SpeakerTurn] = []
        for index, (a, b) in enumerate(groups):
            # A stretch runs from the middle of the overlap of its first window with the previous
            # stretch's last window to the same point at its other end.
            # At a pause, the middle of the pause.
            t0 = start if index == 0 else start + self._boundary(embeddings, a)
            t1 = end if index == len(groups) - 1 else start + self._boundary(embeddings, b)
            t1 = min(max(t1, t0), end)
            label = self.clusterer.assign(_unit(embeddings.partials[a:b].mean(axis=0)), t1 - t0)
            if turns and turns[-1].speaker == label:
                turns[-1] = SpeakerTurn(label, turns[-1].start, t1)
            else:
                turns.append(SpeakerTurn(label, t0, t1))
        longest: dict[int, float] = {}
        for t in turns:
            longest[t.speaker] = longest.get(t.speaker, 0.0) + t.end - t.start
        return Attribution(max(longest, key=longest.__getitem__), tuple(turns))

    @staticmethod
    def _boundary(embeddings: SpeakerEmbeddings, k: int) -> float:
        """Seconds from the utterance's start where a stretch starting at window ``k`` begins."""
        pieces = embeddings.pieces
        if pieces is not None and pieces[k] != pieces[k - 1]:
            pause_start, pause_end = embeddings.pauses[int(pieces[k]) - 1]
            return (pause_start + pause_end) / 2
        return float(embeddings.ends[k - 1] + embeddings.starts[k]) / 2

    def _segment(self, partials: np.ndarray, pieces: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Window index ranges ``[a, b)`` of the speaker stretches of one utterance: cut where the
        two sides' mean embeddings are less similar than ``change_threshold`` (each side at least
        ``min_turn_windows`` windows), or, at a pause between ``pieces``, than
        ``pause_change_threshold`` (each side at least one window); the cut furthest below its
        threshold first, then each side again."""
        s = self.settings
        out: list[tuple[int, int]] = []

        def split(a: int, b: int) -> None:
            best, cut = 0.0, None  # the deepest cut: similarity minus its threshold, below zero
            for k in range(a + 1, b):
                at_pause = pieces is not None and pieces[k] != pieces[k - 1]
                if not at_pause and (k - a < s.min_turn_windows or b - k < s.min_turn_windows):
                    continue
                similarity = float(_unit(partials[a:k].mean(axis=0)) @ _unit(partials[k:b].mean(axis=0)))
                depth = similarity - (s.pause_change_threshold if at_pause else s.change_threshold)
                if depth < best:
                    best, cut = depth, k
            if cut is None:
                out.append((a, b))
            else:
                split(a, cut)
                split(cut, b)

        split(0, len(partials))
        return out
