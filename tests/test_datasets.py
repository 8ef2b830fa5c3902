"""Tests for granite_stream_testing.datasets: split rule, checksums, manifests, audio reading.

Tests marked ``slow`` use the real (fetched, cached) speech data via the conftest
fixtures; the rest run on small synthetic files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from granite_stream_testing import datasets
from granite_stream_testing.datasets import (
    ChecksumError,
    Clip,
    audio_duration,
    load_set,
    parse_transcripts,
    read_audio,
    read_manifest,
    select_prompts,
    verify_sha256,
    write_manifest,
)

ASTERISK_SETS = ("asterisk-en", "asterisk-es", "asterisk-fr")
# Pinned sizes of the dev split (= eval split) per language for asterisk-core-sounds 1.6.1-1.
EXPECTED_DEV_COUNTS = {"asterisk-en": 88, "asterisk-es": 86, "asterisk-fr": 93}
EXPECTED_EVAL_COUNTS = {"asterisk-en": 88, "asterisk-es": 86, "asterisk-fr": 93}
LIBRIVOX_DURATIONS = {  # seconds
    "sense_and_sensibility_01_austen_64kb-0870": 7.10,
    "sense_and_sensibility_01_austen_64kb-0880": 2.99,
    "sense_and_sensibility_01_austen_64kb-0890": 5.30,
    "sense_and_sensibility_01_austen_64kb-0920": 6.05,
    "sense_and_sensibility_01_austen_64kb-0930": 3.29,
}


def _write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(samples, dtype=np.float64)
    if width == 2:
        data = (np.clip(x, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()
    elif width == 3:
        v = (np.clip(x, -1, 1 - 2**-23) * 2**23).astype(np.int32)
        b = v.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        data = b.tobytes()
    else:  # pragma: no cover
        raise ValueError(width)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)
    return path


# --------------------------------------------------------------------------------------
# Synthetic: transcript parsing and the split rule
# --------------------------------------------------------------------------------------


def test_parse_transcripts_format(tmp_path: Path) -> None:
    text = (
        "; Core Asterisk Sounds in French\n"
        "\n"
        "a-prompt: Un deux trois quatre cinq six.\n"
        "followme/options: Vous avez ces options: appuyez sur 1.\n"
        "  spaced  :   texte avec espaces   \n"
        "digits/0: zéro\n"
        "digits/0: dix\n"
        "no colon here\n"
    )
    p = tmp_path / "core-sounds-fr.txt.gz"
    p.write_bytes(gzip.compress(text.encode("utf-8")))
    t = parse_transcripts(p)
    assert t == {
        "a-prompt": "Un deux trois quatre cinq six.",
        "followme/options": "Vous avez ces options: appuyez sur 1.",  # only the first ':' splits
        "spaced": "texte avec espaces",
        "digits/0": "zéro",  # first entry wins for duplicated names
    }


def test_select_prompts_rule_synthetic() -> None:
    six = "one two three four five six"
    transcripts = {
        "b": six,
        "a": six,
        "short": "one two three four five",  # 5 words: excluded
        "bracket": "[ascending tones] one two three four five",  # starts with '[': excluded
        "inner": "one two [three] four five six",  # '[' not at start: kept
        "nowav": six,  # no audio: excluded
        "sub/d": six,
        "c": six,
    }
    wavs = {"a", "b", "c", "short", "bracket", "inner", "sub/d"}
    eligible = ["a", "b", "c", "inner", "sub/d"]
    dev = select_prompts(transcripts, wavs, "dev")
    ev = select_prompts(transcripts, wavs, "eval")
    assert dev == eligible[0::2] == ["a", "c", "sub/d"]
    assert ev == eligible[1::2] == ["b", "inner"]
    assert select_prompts(transcripts, wavs.__contains__) == dev  # callable, default split dev
    with pytest.raises(ValueError):
        select_prompts(transcripts, wavs, "all")


def test_load_set_argument_errors() -> None:
    # Raised before any fetching.
    with pytest.raises(ValueError, match="only a 'dev'"):
        load_set("librivox", "eval")
    with pytest.raises(ValueError, match="only a 'dev'"):
        load_set("goforward", "eval")
    with pytest.raises(ValueError, match="unknown data set"):
        load_set("nope")
    with pytest.raises(ValueError, match="split"):
        load_set("asterisk-en", "test")


def test_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "cache"))
    assert datasets.data_dir() == (tmp_path / "cache").resolve()
    monkeypatch.delenv(datasets.ENV_VAR)
    assert datasets.data_dir() == Path.home() / ".cache" / "granite-stream" / "data"


# --------------------------------------------------------------------------------------
# Synthetic: checksums
# --------------------------------------------------------------------------------------


def test_checksum_mismatch_detected(tmp_path: Path) -> None:
    f = tmp_path / "asterisk-core-sounds-xx_1.0_all.deb"
    f.write_bytes(b"not the pinned bytes")
    good = hashlib.sha256(b"not the pinned bytes").hexdigest()
    verify_sha256(f, good)  # matching hash: no error
    verify_sha256(f, good.upper())  # case-insensitive
    expected = "0" * 64
    with pytest.raises(ChecksumError) as ei:
        verify_sha256(f, expected)
    msg = str(ei.value)
    assert f.name in msg and expected in msg and good in msg
    assert ei.value.expected == expected and ei.value.actual == good


def test_download_is_verified_and_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fetch path with the downloader faked (no network): a wrong payload raises
    ChecksumError and leaves nothing behind; a right one is renamed into place; a
    corrupt cached file is fetched again."""
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "cache"))
    payload = b"pretend .deb"
    art = datasets._Artifact("fake_1.0_all.deb", hashlib.sha256(payload).hexdigest(),
                             len(payload), "deb", "fake", "1.0")
    served = {"bytes": b"tampered", "calls": 0}

    def fake_download(a, tmp: Path, progress: bool) -> None:
        served["calls"] += 1
        (tmp / a.filename).write_bytes(served["bytes"])

    monkeypatch.setattr(datasets, "_download_deb", fake_download)
    downloads = tmp_path / "cache" / "downloads"
    with pytest.raises(ChecksumError, match=r"fake_1\.0_all\.deb.*expected " + art.sha256):
        datasets._ensure_download(art, progress=False)
    assert list(downloads.iterdir()) == []  # temp folder removed, nothing renamed in

    served["bytes"] = payload
    final = datasets._ensure_download(art, progress=False)
    assert final == downloads / art.filename and final.read_bytes() == payload
    assert sorted(p.name for p in downloads.iterdir()) == [art.filename]
    datasets._ensure_download(art, progress=False)  # cached: no new download
    assert served["calls"] == 2

    final.write_bytes(b"truncated")  # corrupt cache entry -> fetched again
    assert datasets._ensure_download(art, progress=False).read_bytes() == payload
    assert served["calls"] == 3


def test_pinned_artifacts_are_well_formed() -> None:
    arts = datasets._ARTIFACTS
    assert len(arts) == 7
    for a in arts.values():
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
    for name in datasets.ALL_SETS:
        assert datasets._set_artifacts(name)


# --------------------------------------------------------------------------------------
# Synthetic: audio and manifests
# --------------------------------------------------------------------------------------


def test_read_audio_wav_and_raw(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    p16 = _write_wav(tmp_path / "mono16.wav", tone, 8000)
    x, sr = read_audio(p16)
    assert sr == 8000 and x.dtype == np.float32 and x.shape == (8000,)
    assert np.max(np.abs(x - tone)) < 1e-3
    assert audio_duration(p16) == pytest.approx(1.0)

    stereo = np.stack([tone, np.zeros_like(tone)], axis=1).reshape(-1)  # L=tone, R=0
    p24 = _write_wav(tmp_path / "stereo24.wav", stereo, 16000, width=3, channels=2)
    y, sr = read_audio(str(p24))
    assert sr == 16000 and y.shape == (8000,) and y.dtype == np.float32
    assert np.max(np.abs(y - tone / 2)) < 1e-4

    raw = tmp_path / "x.raw"
    (np.array([0, 16384, -32768, 32767], dtype="<i2")).tofile(raw)
    z, sr = read_audio(raw)
    assert sr == 16000 and z.dtype == np.float32
    np.testing.assert_allclose(z, [0.0, 0.5, -1.0, 32767 / 32768])
    assert audio_duration(raw) == pytest.approx(4 / 16000)


def test_manifest_roundtrip_synthetic(tmp_path: Path) -> None:
    root = tmp_path / "data"
    a = _write_wav(root / "clips" / "a.wav", np.zeros(800), 8000)
    b = _write_wav(tmp_path / "elsewhere" / "b.wav", np.zeros(1600), 16000)
    clips = [
        Clip("mine/a", a, "über café: «ok»", "fr", 8000, "mine"),
        Clip("mine/b", b, "hello world", "en", 16000, "mine"),
    ]
    for relative in (None, True, False):
        m = write_manifest(clips, root / f"m-{relative}.jsonl", relative=relative)
        assert read_manifest(m) == clips
        recs = [json.loads(line) for line in m.read_text(encoding="utf-8").splitlines()]
        assert set(recs[0]) == {"id", "audio", "text", "language", "sample_rate", "set"}
        assert recs[0]["text"] == "über café: «ok»"
        if relative is None:  # auto: relative only below the manifest folder
            assert recs[0]["audio"] == "clips/a.wav" and Path(recs[1]["audio"]).is_absolute()
        elif relative:
            assert recs[1]["audio"] == "../elsewhere/b.wav"
        else:
            assert all(Path(r["audio"]).is_absolute() for r in recs)

    # Hand-written manifest for one's own data: relative path, no sample_rate / set.
    own = root / "own.jsonl"
    own.write_text('{"id": "x", "audio": "clips/a.wav", "text": "t", "language": "en"}\n\n',
                   encoding="utf-8")
    (c,) = read_manifest(own)
    assert c == Clip("x", a, "t", "en", 8000, "own")


def test_read_manifest_errors(tmp_path: Path) -> None:
    m = tmp_path / "bad.jsonl"
    m.write_text('{"id": "x", "audio": "a.wav", "language": "en"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) text"):
        read_manifest(m)
    line = '{"id": "x", "audio": "a.raw", "text": "t", "language": "en"}\n'
    m.write_text(line + line)
    with pytest.raises(ValueError, match="bad.jsonl:2: duplicate id"):
        read_manifest(m)
    m.write_text("not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_manifest(m)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        datasets.main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "--sets" in out and "--manifest-out" in out


# --------------------------------------------------------------------------------------
# Real data (fetched on first use)
# --------------------------------------------------------------------------------------


def _name(c: Clip) -> str:
    return c.id.split("/", 1)[1]


@pytest.fixture(scope="module")
def asterisk_splits(asterisk_en_dev: list[Clip]) -> dict[str, tuple[list[Clip], list[Clip]]]:
    # asterisk_en_dev first so that a missing-data skip happens once, in the fixture.
    return {s: (load_set(s, "dev"), load_set(s, "eval")) for s in ASTERISK_SETS}


@pytest.mark.slow
@pytest.mark.parametrize("name", ASTERISK_SETS)
def test_asterisk_split_rule(name: str, asterisk_splits) -> None:
    dev, ev = asterisk_splits[name]
    assert len(dev) == EXPECTED_DEV_COUNTS[name]
    assert len(ev) == EXPECTED_EVAL_COUNTS[name]
    dev_names, ev_names = [_name(c) for c in dev], [_name(c) for c in ev]
    # disjoint
    assert not set(dev_names) & set(ev_names)
    # alternating over the sorted union of eligible prompts
    union = sorted(dev_names + ev_names)
    assert dev_names == union[0::2]
    assert ev_names == union[1::2]
    # deterministic
    assert load_set(name, "dev") == dev
    assert load_set(name, "eval") == ev
    # the union is exactly the eligible set, recomputed here from the raw files
    wav_root = dev[0].audio_path.parents[len(Path(_name(dev[0])).parts) - 1]
    lang = name.split("-")[1]
    txt = (datasets._unpacked_dir(datasets._ARTIFACTS[f"asterisk-core-sounds-{lang}"])
           / f"usr/share/doc/asterisk-core-sounds-{lang}/core-sounds-{lang}.txt.gz")
    transcripts = parse_transcripts(txt)
    eligible = sorted(
        n for n, t in transcripts.items()
        if len(t.split()) >= 6 and not t.startswith("[") and (wav_root / f"{n}.wav").is_file()
    )
    assert union == eligible


@pytest.mark.slow
@pytest.mark.parametrize("name", ASTERISK_SETS)
def test_asterisk_dev_clips_valid(name: str, asterisk_splits) -> None:
    dev, _ = asterisk_splits[name]
    lang = name.split("-")[1]
    for c in dev:
        assert len(c.text.split()) >= 6, c
        assert not c.text.startswith("[")
        assert c.audio_path.is_file() and c.audio_path.suffix == ".wav"
        assert c.id == f"{name}/{_name(c)}"
        assert c.audio_path.as_posix().endswith(f"/{_name(c)}.wav")
        assert (c.language, c.sample_rate, c.set) == (lang, 8000, name)
    # prompts from sub-folders (followme/, dictate/) are included
    assert any("/" in _name(c) for c in dev)


@pytest.mark.slow
def test_asterisk_en_dev_fixture_is_dev(asterisk_en_dev: list[Clip], asterisk_splits) -> None:
    dev, ev = asterisk_splits["asterisk-en"]
    assert asterisk_en_dev == dev
    assert not {c.id for c in asterisk_en_dev} & {c.id for c in ev}


@pytest.mark.slow
def test_read_audio_asterisk(asterisk_en_dev: list[Clip]) -> None:
    for c in asterisk_en_dev[:10]:
        x, sr = read_audio(c)
        assert sr == 8000 and x.ndim == 1 and x.dtype == np.float32
        with wave.open(str(c.audio_path)) as w:
            assert len(x) == w.getnframes()
        assert len(x) / sr == pytest.approx(audio_duration(c))
        assert 0.5 < len(x) / sr < 120
        assert 0.01 < np.max(np.abs(x)) <= 1.0


@pytest.mark.slow
def test_librivox(librivox_clips: list[Clip], librivox_wav_paths: list[Path]) -> None:
    assert [c.id.split("/", 1)[1] for c in librivox_clips] == sorted(LIBRIVOX_DURATIONS)
    assert librivox_wav_paths == [c.audio_path for c in librivox_clips]
    for c in librivox_clips:
        assert (c.language, c.set, c.sample_rate) == ("en", "librivox", 16000)
        assert c.text == c.text.strip() and c.text.islower() and len(c.text.split()) >= 6
        x, sr = read_audio(c)
        assert sr == 16000 and x.dtype == np.float32 and x.ndim == 1
        assert len(x) / sr == pytest.approx(LIBRIVOX_DURATIONS[c.audio_path.stem], abs=1e-3)
        assert 0.05 < np.max(np.abs(x)) <= 1.0
    assert librivox_clips[0].text.startswith("and mister john dashwood")


@pytest.mark.slow
def test_goforward(goforward: Clip) -> None:
    assert goforward.text == "go forward ten meters"
    assert goforward.audio_path.suffix == ".raw" and goforward.sample_rate == 16000
    x, sr = read_audio(goforward)
    assert sr == 16000 and x.dtype == np.float32 and len(x) == 44580  # 2.786 s
    x2, sr2 = read_audio(goforward.audio_path)  # path: .raw defaults to 16 kHz
    assert sr2 == 16000 and np.array_equal(x, x2)
    assert 0.05 < np.max(np.abs(x)) <= 1.0


@pytest.mark.slow
def test_manifest_roundtrip_real(tmp_path: Path, asterisk_en_dev, librivox_clips, goforward) -> None:
    clips = asterisk_en_dev + librivox_clips + [goforward]
    m = write_manifest(clips, tmp_path / "all.jsonl")
    back = read_manifest(m)
    assert back == clips
    for c in back[-2:]:
        assert read_audio(c)[1] == 16000


@pytest.mark.slow
def test_complete_cache_is_a_noop(monkeypatch: pytest.MonkeyPatch, asterisk_splits,
                                  librivox_clips, goforward) -> None:
    def boom(*a, **k):  # no downloads, no subprocesses, no hashing of archives
        raise AssertionError("fetch_all touched the network/tools with a complete cache")

    monkeypatch.setattr(datasets, "_ensure_download", boom)
    monkeypatch.setattr(datasets, "_run", boom)
    monkeypatch.setattr(datasets, "sha256_file", boom)
    datasets.fetch_all(datasets.ALL_SETS, progress=False)
    assert datasets.load_set("asterisk-fr", progress=False) == asterisk_splits["asterisk-fr"][0]


# --------------------------------------------------------------------------------------
# The stress set: phrases joined by pauses shorter than the end-of-speech silence
# --------------------------------------------------------------------------------------


def test_stress_plan_is_deterministic_and_bounded() -> None:
    phrases = [Clip(f"asterisk-en/p{i:03d}", Path(f"/x/p{i}.wav"), f"phrase {i}", "en", 8000, "asterisk-en")
               for i in range(80)]
    durations = {c.id: 2.0 + (i % 7) for i, c in enumerate(phrases)}
    durations["asterisk-en/p003"] = 31.0  # a long prompt is not a phrase: left out
    books = [Clip(f"librivox/b{i}", Path(f"/x/b{i}.wav"), f"book {i}", "en", 16000, "librivox") for i in range(5)]
    durations.update({c.id: 5.0 for c in books})
    plan = datasets.stress_plan(phrases, books, durations=lambda c: durations[c.id])
    assert plan == datasets.stress_plan(phrases, books, durations=lambda c: durations[c.id])
    chains = [item for item in plan if item.name.startswith("chain-")]
    assert len(chains) == datasets.STRESS_CHAINS
    used = [c.id for item in chains for c in item.sources]
    assert "asterisk-en/p003" not in used and used == sorted(used) and len(used) == len(set(used))
    totals = [sum(durations[c.id] for c in item.sources) + sum(item.gaps_s) for item in chains]
    assert max(totals) <= datasets.STRESS_MAX_CHAIN_S
    assert any(t > 20.0 for t in totals) and any(t < 20.0 for t in totals)  # the default cut, both sides
    for item in plan:
        assert len(item.gaps_s) == len(item.sources) - 1
        assert all(0.15 <= g <= 0.40 for g in item.gaps_s)
        assert item.text == " ".join(c.text for c in item.sources)
    assert plan[-1].name == "librivox-reading" and plan[-1].sources == tuple(books)


@pytest.mark.slow
def test_stress_set_built_from_dev_data(asterisk_en_dev: list[Clip], librivox_clips: list[Clip]) -> None:
    """The built audio holds the drawn pauses, and the VAD keeps each chain as one utterance until
    the longest-utterance cut (no end of speech inside a chain of prompts)."""
    import soxr

    from vad import SpeechEnded, VadSegmenter

    clips = load_set(datasets.STRESS_SET, progress=False)
    index = {e["name"]: e for e in json.loads((clips[0].audio_path.parent / "clips.json").read_text())}
    assert [c.id.split("/", 1)[1] for c in clips] == list(index)
    assert set(s for e in index.values() for s in e["sources"]) <= {c.id for c in asterisk_en_dev + librivox_clips}
    for clip in clips:
        entry = index[clip.id.split("/", 1)[1]]
        x, rate = read_audio(clip)
        assert rate == entry["sample_rate"] and len(x) / rate <= datasets.STRESS_MAX_CHAIN_S
        zero_runs = np.diff(np.flatnonzero(np.diff(np.r_[0, (x == 0).astype(np.int8), 0])))[::2] / rate
        for gap in entry["gaps_s"]:  # each pause is there, as digital silence of its drawn length
            assert np.any(np.abs(zero_runs - gap) < 0.01), (clip.id, gap)
        segmenter = VadSegmenter()
        ends = [e for e in segmenter.feed(soxr.resample(x, rate, 16000).astype(np.float32))
                if isinstance(e, SpeechEnded)]
        silences = [e for e in ends if e.reason == "silence"]
        if "chain-" in clip.id:  # clean prompts: only the cut ends an utterance inside a chain
            assert not silences, (clip.id, ends)
        else:  # a reading has its own pauses at sentence ends; most joins still do not end speech
            assert len(silences) < len(entry["gaps_s"]) / 2, (clip.id, ends)
    assert sum(datasets.audio_duration(c) > 20.0 for c in clips) >= 3
