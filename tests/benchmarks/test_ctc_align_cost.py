"""benchmarks/ctc_align_cost.py: the word-timing Viterbi's cost benchmark (moved from the engine's tests: tests import
``benchmarks`` only here)."""


def test_the_cost_benchmark_finds_the_numpy_baselines_paths(capsys):
    """benchmarks/ctc_align_cost.py runs and the compiled Viterbi matches its numpy baseline there."""
    from benchmarks import ctc_align_cost

    assert ctc_align_cost.main(["--seconds", "1,3", "--repeats", "1", "--batch", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [row.split()[-1] for row in rows] == ["True", "True"]
