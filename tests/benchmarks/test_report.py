"""The bench's target checks (benchmarks.report.add_comparisons) read issue #16's WER ratio."""

from benchmarks.report import WER_RATIO_TARGET, add_comparisons


def _results(streaming_wers: dict[str, float], offline_wer: float = 0.0324) -> dict:
    return {"sets": {name: {"streaming": {"wer": wer, "stable_revisions": 0},
                            "offline": {"engine": {"wer": offline_wer}}}
                     for name, wer in streaming_wers.items()}}


def test_wer_ratio_target_is_issue_16s_and_every_set_must_meet_it():
    assert WER_RATIO_TARGET == 1.05
    within = _results({"asterisk-en": 0.0324 * 1.04, "stress-en": 0.0324})
    add_comparisons(within)
    assert within["sets"]["asterisk-en"]["wer_ratio"]["engine"] == 1.04
    assert within["targets"]["wer_ratio_target_met"] is True
    assert within["targets"]["wer_ratio_target"] == 1.05

    # Seventh to ninth sessions' one-stream asterisk-en: 3.48 % against 3.24 % offline.
    over = _results({"asterisk-en": 0.0348, "stress-en": 0.0100})
    add_comparisons(over)
    assert over["targets"]["wer_ratio_vs_engine_offline_max"] == round(0.0348 / 0.0324, 4)
    assert over["targets"]["wer_ratio_target_met"] is False
