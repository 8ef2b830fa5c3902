"""The diarization benchmark's scoring (benchmarks.diarization)."""


def test_the_benchmark_scores_turns_under_the_best_label_mapping():
    from granite_stream_testing.datasets import Clip
    from benchmarks.diarization import Turn, score

    clip = Clip("x/y", None, "", "en", 16000, "x")
    turns = [Turn("a", clip, 0, 3), Turn("b", clip, 3.5, 6), Turn("a", clip, 7, 9), Turn("b", clip, 9.5, 12)]
    finals = [{"start": 0, "end": 3, "speaker": 1},
              # one final over two turns, its change of speaker inside it
              {"start": 3.5, "end": 9, "speaker": 0, "speaker_turns": [{"speaker": 0, "start": 3.5, "end": 6.2},
                                                                      {"speaker": 1, "start": 6.2, "end": 9}]},
              {"start": 9.5, "end": 12, "speaker": 2}]
    result = score(turns, finals)
    assert result["correct"] == 3 and result["speakers_found"] == 3 and result["speakers_true"] == 2


def test_the_breakdown_says_where_turns_were_lost():
    from granite_stream_testing.datasets import Clip
    from benchmarks.diarization import Turn, breakdown, score

    clip = Clip("x/y", None, "", "en", 16000, "x")
    turns = [Turn("a", clip, 0, 2.5), Turn("b", clip, 3, 7), Turn("a", clip, 7.3, 9), Turn("b", clip, 10, 15)]
    # The second and third turns came out as one final labelled b: the third turn (a's second,
    # 1.7 s long) is lost, inside a final joined with another turn.
    finals = [{"start": 0, "end": 2.5, "speaker": 0}, {"start": 3, "end": 9, "speaker": 1},
              {"start": 10, "end": 15, "speaker": 1}]
    table = breakdown([score(turns, finals)])
    assert table["all"] == {"turns": 4, "wrong": 1, "error_rate": 0.25}
    assert table["joined_with_another_turn"]["yes"]["wrong"] == 1 and table["joined_with_another_turn"]["no"]["wrong"] == 0
    assert table["by_nth_turn_of_speaker"]["2"]["wrong"] == 1 and table["errors_by_kind"] == {"other_speaker": 1}


def test_offline_scoring_labels_vad_like_utterances_with_their_turns():
    # Two turns 0.3 s apart come out of the VAD as one utterance; the offline stand-in joins them
    # the same way, and the tracker's cut inside it gives each turn its own speaker.
    import numpy as np

    from granite_stream_testing.datasets import Clip
    from benchmarks.diarization import Conversation, Turn, label_utterances, vad_like_utterances
    from stream_server.speakers.clustering import SpeakerSettings
    from stream_server.speakers.encoder import SpeakerEmbeddings

    clip = Clip("x/y", None, "", "en", 16000, "x")
    conv = Conversation(0, ("a", "b"), [Turn("a", clip, 0, 3), Turn("b", clip, 3.3, 6), Turn("a", clip, 7, 9)],
                        np.zeros(8000 * 10, np.float32))
    spans = vad_like_utterances(conv)
    assert spans == [(0, 6), (7, 9)]
    a, b = np.eye(256)[0], np.eye(256)[1]

    def windows(*voices):
        starts = np.arange(len(voices)) * 0.77
        return SpeakerEmbeddings(np.stack(voices), starts, starts + 1.6)

    embedded = [[(spans[0], windows(a, a, a, b, b, b)), (spans[1], windows(a, a))]]
    [result] = label_utterances([conv], embedded, SpeakerSettings())
    assert result["correct"] == 3 and result["speakers_found"] == 2
