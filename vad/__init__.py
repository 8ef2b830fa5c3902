"""Voice activity detection and utterance segmentation (pure, no I/O, no model).

See :mod:`vad.segmenter` for the event contract.
"""

from .segmenter import SpeechEnded, SpeechStarted, VadConfig, VadEvent, VadSegmenter, brief, is_real

__all__ = ["SpeechEnded", "SpeechStarted", "VadConfig", "VadEvent", "VadSegmenter", "brief", "is_real"]
