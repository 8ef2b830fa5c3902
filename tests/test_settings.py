"""The settings object: sources, precedence, validation, and the README table generated from it."""

import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest

from stream_server.cli import main, server_settings
from stream_server.server.logs import configure_logging, current_session
from stream_server.settings import BY_KEY, SETTINGS, ConfigError, ServeConfig, load_config, render


def test_precedence_defaults_toml_env_flags(tmp_path):
    toml = tmp_path / "granite.toml"
    toml.write_text('[serve]\nport = 7000\nmax_queue = 9\nlog_transcripts = true\nhost = "0.0.0.0"\n')
    env = {"GRANITE_STREAM_MAX_QUEUE": "10", "GRANITE_STREAM_MAX_BATCH": "4"}
    config = load_config({"max_batch": "2"}, env, toml)
    assert config.network.port == 7000 and config.network.host == "0.0.0.0"  # TOML over defaults
    assert config.worker.max_queue == 10  # environment over TOML
    assert config.worker.max_batch == 2  # flags over environment
    assert config.logging.log_transcripts is True and config.limits.max_sessions == ServeConfig().limits.max_sessions


def test_config_file_can_come_from_the_environment(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("idle_timeout_s = 5\n")
    assert load_config({}, {"GRANITE_STREAM_CONFIG": str(toml)}).limits.idle_timeout_s == 5.0


@pytest.mark.parametrize(
    "cli, env, toml, fragment",
    [
        ({"port": "abc"}, {}, None, "--port: port must be an integer"),
        ({}, {"GRANITE_STREAM_REALTIME_FACTOR": "fast"}, None, "GRANITE_STREAM_REALTIME_FACTOR"),
        ({}, {"GRANITE_STREAM_ENGINE": "gpt"}, None, "engine must be one of"),
        ({}, {}, "colour = 1\n", "unknown setting(s) colour"),
        ({}, {}, "port = [", "c.toml"),
        ({}, {}, "log_transcripts = 3\n", "true or false"),
        ({"max_upload_bytes": "0"}, {}, None, "max_upload_bytes must be >= 1"),
        ({}, {"GRANITE_STREAM_MAX_UPLOAD_AUDIO_S": "-1"}, None, "max_upload_audio_s must be >= 0"),
    ],
)
def test_bad_settings_name_their_source(tmp_path, cli, env, toml, fragment):
    path = None
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(cli, env, path)
    assert fragment in str(info.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, {}, tmp_path / "nope.toml")


def test_print_config_reflects_sources(capsys, monkeypatch):
    monkeypatch.setenv("GRANITE_STREAM_PORT", "9100")
    assert main(["serve", "--max-batch", "3", "--print-config", "--print-config-format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["port"] == 9100 and printed["max_batch"] == 3 and printed["engine"] == "auto"
    assert main(["serve", "--print-config"]) == 0
    assert "[worker]\nmax_batch = 8\n" in capsys.readouterr().out


def test_readme_table_matches_the_settings_definition():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- settings-table:start -->\n") + len("<!-- settings-table:start -->\n")
    end = readme.index("<!-- settings-table:end -->")
    assert readme[start:end].strip() == render(ServeConfig(), "markdown").strip()


def test_server_settings_follow_the_config(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# ops team\n" + "a" * 20 + "\n")
    settings = server_settings(load_config({"api_keys_file": str(keys), "allowed_origins": "https://x.example",
                                            "max_session_s": "60", "realtime_factor": "0"}, {}))
    assert settings.access.api_keys == frozenset({"a" * 20})
    assert settings.access.allowed_origins == frozenset({"https://x.example"})
    assert settings.session.max_session_s == 60 and settings.limits.realtime_factor == 0
    assert settings.session.refresh_waiting_partials  # on unless asked otherwise
    assert not server_settings(load_config({"partial_refresh": "off"}, {})).session.refresh_waiting_partials
    with pytest.raises(ConfigError, match="partial_refresh"):
        load_config({"partial_refresh": "sometimes"}, {})


def test_json_logs_carry_the_session_id():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        token = current_session.set("abc123")
        logging.getLogger("granite_stream.test").info("hello %s", "world")
        current_session.reset(token)
        logging.getLogger("granite_stream.test").warning("no session")
    finally:
        logging.getLogger().handlers.clear()
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["message"] == "hello world" and first["session_id"] == "abc123" and first["level"] == "INFO"
    assert "session_id" not in second and second["level"] == "WARNING"


def test_granite_settings_reach_the_engine(monkeypatch):
    # --granite-encoder-batching / --granite-decode-max-graphs / ... become the engine's GraniteOptions.
    import stream_server.engines.granite.engine as granite_module
    from stream_server.cli import load_configured_engine

    seen = {}

    class Recorder:
        model_path = None  # Engine.model_path, read by the speaker wrapper

        def __init__(self, model, **kwargs):
            seen.update(kwargs, model=model)

    monkeypatch.setattr(granite_module, "GraniteEngine", Recorder)
    config = load_config({"engine": "granite", "granite_encoder_batching": "padded", "max_batch": "16",
                          "granite_decode_max_graphs": "32",
                          "granite_warm_decode_seconds": " 2.5, 8 "}, {})
    load_configured_engine(config, "cpu")
    options = seen["options"]
    assert options.encoder_batching == "padded" and options.max_batch == 16
    assert (options.decode_max_graphs, options.compile_step) == (32, False)
    assert options.speculative is True and options.ctc_entropy_threshold == 0.7 and options.verify_threshold == 0.1
    off = load_config({"granite_speculation": "off", "granite_ctc_entropy_threshold": "0.3",
                       "granite_verify_threshold": "0.25", "granite_compile_step": "auto"}, {}).granite.options()
    assert (off.speculative, off.ctc_entropy_threshold, off.verify_threshold) == (False, 0.3, 0.25)
    assert off.compile_step == "auto"
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="granite_verify_threshold"):
            load_config({"granite_verify_threshold": bad}, {})
    assert options.warm_decode_seconds == (2.5, 8.0)
    for bad in ("3,x", "0", "-1,2", "nan"):
        with pytest.raises(ConfigError, match="granite_warm_decode_seconds"):
            load_config({"granite_warm_decode_seconds": bad}, {})
    assert load_config({"granite_warm_decode_seconds": ""}, {}).granite.options().warm_decode_seconds == ()
    with pytest.raises(ConfigError, match="granite_encoder_batching"):
        load_config({"granite_encoder_batching": "sloppy"}, {})


def test_the_granite_section_s_defaults_are_the_engine_s_defaults():
    # The section takes its defaults from GraniteOptions and maps them back: untouched settings give
    # the engine exactly its own default options (no default written twice, none lost on the way).
    from stream_server.engines.granite.options import GraniteOptions

    assert ServeConfig().granite.options() == GraniteOptions()
    assert ServeConfig().granite.options(max_batch=3) == GraniteOptions(max_batch=3)


# ---- every setting reaches the object that uses it ---------------------------------------------

class _Captured(Exception):
    """Raised by the fake StreamServer's start(): everything the serve command built is recorded by then."""


def _serve_and_capture(argv: list[str], monkeypatch) -> dict:
    """Run ``granite-stream serve ARGV`` up to the point where it would listen, and return what it built.

    Only the outermost seams are faked: the engine loader, the StreamServer class, the Ray pool's
    connect_pool, the child-process spawn of --processes, the glibc calls and the logging setup.
    Everything between the flags and those seams is the real code.
    """
    import signal
    import subprocess

    import stream_server.cli as cli
    import stream_server.engines as engines
    import stream_server.inference.ray_pool as ray_pool
    import stream_server.server.app as server_module
    from stream_server.inference import memory
    from tests.fakes import CountingEngine

    seen: dict = {"load_engine": [], "spawned": []}

    def load_engine(name, model, device, cpu_threads, max_batch, granite=None, preload_speakers=False):
        seen["load_engine"].append(dict(name=name, model=model, device=device, cpu_threads=cpu_threads,
                                        max_batch=max_batch, granite=granite, preload_speakers=preload_speakers))
        return CountingEngine(max_batch=max_batch or 8), "faked"  # an engine bounds its worker's batches

    class Server:
        def __init__(self, engine, settings, reason="", worker=None, routes=None):
            seen.update(settings=settings, worker=worker, routes=routes)

        async def start(self):
            raise _Captured

    class Pool:
        engine, description = CountingEngine(), "faked pool"

    def connect_pool(settings):
        seen["ray"] = settings
        return Pool()

    class Child:
        def __init__(self, cmd, env):
            seen["spawned"].append((cmd, env))

        def poll(self):
            raise KeyboardInterrupt  # ends the supervisor loop once every child is spawned

    monkeypatch.setattr(engines, "cuda_available", lambda: False)  # what `auto` choices ask, on any machine
    monkeypatch.setattr(cli, "load_engine", load_engine)
    monkeypatch.setattr(server_module, "StreamServer", Server)
    monkeypatch.setattr(ray_pool, "connect_pool", connect_pool)
    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr(memory, "limit_arenas", lambda n: seen.__setitem__("arenas", n))
    monkeypatch.setattr(memory, "fix_mmap_threshold", lambda n: seen.__setitem__("mmap_threshold", n))
    monkeypatch.setattr(cli, "configure_logging", lambda level, fmt="text", *a: seen.__setitem__("logging", (level, fmt)))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # --processes sets its own
    try:
        try:
            status = main(["serve", *argv])
        except _Captured:
            status = None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    seen["status"] = status
    return seen


def _scheduler(seen):
    return seen["worker"].scheduler


# For each setting: (extra flags it needs to matter, a value other than its default, what it must
# become where it is used). The values are given as flag strings, so they also go through parsing.
RUNTIME = {
    "host": ([], "10.1.2.3", lambda s: s["settings"].network.host, "10.1.2.3"),
    "port": ([], "9123", lambda s: s["settings"].network.port, 9123),
    "engine": ([], "whisper", lambda s: s["load_engine"][0]["name"], "whisper"),
    "model": ([], "/models/x", lambda s: s["load_engine"][0]["model"], "/models/x"),
    "device": ([], "cpu", lambda s: s["load_engine"][0]["device"], "cpu"),
    "gpus": ([], "3", lambda s: [c["device"] for c in s["load_engine"]], ["cuda:0", "cuda:1", "cuda:2"]),
    "cpu_threads": ([], "3", lambda s: s["load_engine"][0]["cpu_threads"], 3),
    "processes": ([], "3", lambda s: [c[c.index("serve") + 1:] for c, _ in s["spawned"]],
                  [["--processes", "3", "--processes", "1", "--reuse-port"]] * 3),
    "inference": ([], "ray", lambda s: "ray" in s and "settings" in s, True),
    "ray_address": (["--inference", "ray"], "ray://head:10001", lambda s: s["ray"].address, "ray://head:10001"),
    "ray_app": (["--inference", "ray"], "captions", lambda s: s["ray"].app_name, "captions"),
    "ray_deploy": (["--inference", "ray"], "never", lambda s: s["ray"].deploy, "never"),
    "ray_min_replicas": (["--inference", "ray", "--ray-max-replicas", "5"], "3", lambda s: s["ray"].min_replicas, 3),
    "ray_max_replicas": (["--inference", "ray"], "4", lambda s: s["ray"].max_replicas, 4),
    "ray_target_ongoing": (["--inference", "ray"], "7.5", lambda s: s["ray"].target_ongoing_requests, 7.5),
    "ray_gpus_per_replica": (["--inference", "ray"], "0.5", lambda s: s["ray"].gpus_per_replica, 0.5),
    "ray_cpus_per_replica": (["--inference", "ray"], "2", lambda s: s["ray"].cpus_per_replica, 2.0),
    "ray_max_inflight": (["--inference", "ray"], "40", lambda s: s["ray"].max_inflight, 40),
    "ray_local_cpus": (["--inference", "ray"], "6", lambda s: s["ray"].local_num_cpus, 6),
    "granite_encoder_batching": ([], "padded", lambda s: s["load_engine"][0]["granite"].encoder_batching, "padded"),
    "granite_decode_max_graphs": ([], "32", lambda s: s["load_engine"][0]["granite"].decode_max_graphs,
                                  32),
    "granite_warm_decode_seconds": ([], "2.5,8", lambda s: s["load_engine"][0]["granite"].warm_decode_seconds,
                                    (2.5, 8.0)),
    "granite_compile_step": ([], "on", lambda s: s["load_engine"][0]["granite"].compile_step, True),
    "granite_speculation": ([], "off", lambda s: s["load_engine"][0]["granite"].speculative, False),
    "granite_ctc_entropy_threshold": ([], "0.5", lambda s: s["load_engine"][0]["granite"].ctc_entropy_threshold, 0.5),
    "granite_verify_threshold": ([], "0.3", lambda s: s["load_engine"][0]["granite"].verify_threshold, 0.3),
    # gpu: GPU_PRESET's measured configuration for every setting not given (settings.py)
    "preset": ([], "gpu", lambda s: (_scheduler(s).max_batch, _scheduler(s).max_queue, s["settings"].limits.max_sessions),
               (64, 8192, 1000)),
    "max_batch": ([], "16", lambda s: (s["load_engine"][0]["max_batch"], _scheduler(s).max_batch), (16, 16)),
    "max_wait_ms": ([], "20", lambda s: _scheduler(s).max_wait, 0.02),
    "max_queue": ([], "64", lambda s: (_scheduler(s).max_queue, s["settings"].worker.max_queue), (64, 64)),
    "early_final_ms": ([], "350", lambda s: s["settings"].session.early_final_s, 0.35),
    "stable_agreement_s": ([], "1.5", lambda s: s["settings"].session.stable_agreement_s, 1.5),
    "partial_refresh": ([], "off", lambda s: s["settings"].session.refresh_waiting_partials, False),
    "diarize_threshold": ([], "0.7", lambda s: s["settings"].session.speakers.threshold, 0.7),
    "diarize_max_speakers": ([], "3", lambda s: s["settings"].session.speakers.max_speakers, 3),
    "diarize_change_threshold": ([], "0.6", lambda s: s["settings"].session.speakers.change_threshold, 0.6),
    "diarize_pause_change_threshold": ([], "0.8", lambda s: s["settings"].session.speakers.pause_change_threshold,
                                       0.8),
    "diarize_preload": ([], None, lambda s: s["load_engine"][0]["preload_speakers"], True),
    "max_sessions": ([], "10", lambda s: s["settings"].limits.max_sessions, 10),
    "max_sessions_per_ip": ([], "3", lambda s: s["settings"].limits.max_sessions_per_ip, 3),
    "max_frame_bytes": ([], "4096", lambda s: s["settings"].session.max_frame_bytes, 4096),
    "max_utterance_s": ([], "12", lambda s: s["settings"].session.limits.max_utterance_s, 12.0),
    "max_session_s": ([], "60", lambda s: s["settings"].session.max_session_s, 60.0),
    "max_upload_bytes": ([], "1048576", lambda s: s["settings"].limits.max_upload_bytes, 1 << 20),
    "max_upload_audio_s": ([], "120", lambda s: s["settings"].limits.max_upload_audio_s, 120.0),
    "upload_timeout_s": ([], "30", lambda s: s["settings"].limits.upload_timeout_s, 30.0),
    "idle_timeout_s": ([], "7", lambda s: s["settings"].limits.idle_timeout_s, 7.0),
    "realtime_factor": ([], "0", lambda s: s["settings"].limits.realtime_factor, 0.0),
    "drain_deadline_s": ([], "3", lambda s: s["settings"].limits.drain_deadline_s, 3.0),
    "api_keys_file": ([], "{keys}", lambda s: s["settings"].access.api_keys, frozenset({"a" * 24})),
    "allowed_origins": ([], "https://a.example, https://b.example", lambda s: s["settings"].access.allowed_origins,
                        frozenset({"https://a.example", "https://b.example"})),
    "certfile": ([], "/tls/chain.pem", lambda s: (s["settings"].security.cert_path, s["settings"].security.key_path),
                 (Path("/tls/chain.pem"), Path("/tls/chain.pem"))),
    "keyfile": (["--certfile", "/tls/chain.pem"], "/tls/key.pem", lambda s: s["settings"].security.key_path,
                Path("/tls/key.pem")),
    "malloc_arenas": ([], "5", lambda s: s["arenas"], 5),
    "malloc_mmap_threshold_kb": ([], "512", lambda s: s["mmap_threshold"], 512 * 1024),
    "memory_trim_s": ([], "5", lambda s: s["settings"].memory.memory_trim_s, 5.0),
    "log_transcripts": ([], None, lambda s: s["settings"].logging.log_transcripts, True),
    "log_format": ([], "json", lambda s: s["logging"][1], "json"),
    "log_level": ([], "DEBUG", lambda s: s["logging"][0], "DEBUG"),
}


def test_every_setting_has_a_runtime_check():
    """A new setting must say here where it lands (or this fails), so none can be parsed and then ignored."""
    assert set(BY_KEY) - set(RUNTIME) == set()


@pytest.mark.parametrize("name", [s.key for s in SETTINGS])
def test_every_setting_reaches_the_object_that_uses_it(name, tmp_path, monkeypatch):
    if name not in RUNTIME:
        pytest.fail(f"setting {name!r} has no entry in RUNTIME: say where it must arrive")
    for setting in SETTINGS:  # the settings must not come from this machine's environment
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.delenv("GRANITE_STREAM_CONFIG", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("a" * 24 + "\n")
    context, value, observe, expected = RUNTIME[name]
    flag = BY_KEY[name].flag
    argv = context + ([flag] if value is None else [flag, value.format(keys=keys)])
    default = _serve_and_capture(context, monkeypatch)
    given = _serve_and_capture(argv, monkeypatch)
    assert observe(given) == expected, (name, observe(given))
    assert observe(default) != expected, f"{name}: the test value must differ from what the default gives"
    if BY_KEY[name].kind is bool:  # the flag form: present means true
        assert load_config({name: True}, {}).value(name) is True


def test_gpu_preset_is_the_measured_configuration_on_cuda_only():
    """The served path is the measured path: on a CUDA device the GPU preset fills every setting no
    source gave; on the CPU the defaults stay. Device detection is faked at the settings level."""
    from stream_server.settings import GPU_PRESET, load_config_and_sources, resolve_preset

    config, explicit = load_config_and_sources({"engine": "granite", "model": "/m"}, {})
    gpu, why = resolve_preset(config, explicit, cuda_available=lambda: True)
    assert "CUDA device" in why
    assert gpu.engine.preset == "gpu" and {k: gpu.value(k) for k in GPU_PRESET} == GPU_PRESET
    assert (gpu.worker.max_batch, gpu.granite.encoder_batching, gpu.granite.compile_step) == (64, "padded", "auto")
    cpu, why = resolve_preset(config, explicit, cuda_available=lambda: False)
    assert cpu == config.with_values({"preset": "cpu"}) and "no CUDA" in why
    # A setting some source gave is kept, and the reason says so.
    config, explicit = load_config_and_sources({"engine": "granite", "max_batch": "16"},
                                               {"GRANITE_STREAM_MAX_QUEUE": "100"})
    gpu, why = resolve_preset(config, explicit, cuda_available=lambda: True)
    assert (gpu.worker.max_batch, gpu.worker.max_queue, gpu.granite.encoder_batching) == (16, 100, "padded")
    assert "kept as given: max_batch, max_queue" in why
    # Never where Granite is not the GPU engine, and forced either way when asked.
    for fields in ({"engine": "whisper"}, {"engine": "auto"}, {"engine": "granite", "device": "cpu"},
                   {"engine": "granite", "inference": "ray"}):
        assert resolve_preset(*load_config_and_sources(fields, {}), cuda_available=lambda: True)[0].engine.preset == "cpu"
    gpu = resolve_preset(*load_config_and_sources({"preset": "gpu"}, {}), cuda_available=lambda: False)[0]
    assert gpu.worker.max_batch == 64
    cpu = resolve_preset(*load_config_and_sources({"preset": "cpu"}, {}), cuda_available=lambda: True)[0]
    assert cpu.worker.max_batch == 8
    assert ServeConfig().worker.max_batch == 8 and ServeConfig().granite.encoder_batching == "exact"  # CPU defaults stay


def test_print_config_shows_the_preset_and_why(capsys, monkeypatch):
    import stream_server.engines as engines

    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    assert main(["serve", "--engine", "granite", "--max-queue", "50", "--print-config"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("# preset gpu: a CUDA device is present") and "kept as given: max_queue" in first
    assert 'preset = "gpu"' in out and "max_batch = 64" in out and "max_queue = 50" in out
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    assert main(["serve", "--engine", "granite", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# preset cpu: no CUDA device") and "max_batch = 8" in out
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    assert main(["serve", "--print-config"]) == 0  # engine auto: it may fall back to Whisper on the CPU
    assert capsys.readouterr().out.startswith("# preset cpu: engine auto")


def test_toml_sections_and_the_flat_keys_of_before(tmp_path):
    """A file may give settings in their sections' tables or flat by key (top level or [serve]); what
    --print-config prints loads back as the same settings."""
    path = tmp_path / "c.toml"
    path.write_text('[engine]\nname = "whisper"\n[engine.granite]\nencoder_batching = "padded"\n'
                    '[worker]\nmax_batch = 4\n[pool.ray]\naddress = "auto"\n')
    config = load_config({}, {}, path)
    assert (config.engine.name, config.granite.encoder_batching, config.worker.max_batch, config.ray.address) == (
        "whisper", "padded", 4, "auto")
    path.write_text('engine = "whisper"\ngranite_encoder_batching = "padded"\n[serve]\nmax_batch = 4\n'
                    'ray_address = "auto"\n')
    assert load_config({}, {}, path) == config
    path.write_text(render(config.with_values({"port": 9000, "log_transcripts": True})))
    assert load_config({}, {}, path) == config.with_values({"port": 9000, "log_transcripts": True})
    for text, fragment in (('max_batch = 2\n[worker]\nmax_batch = 3\n', "max_batch is given twice"),
                           ('[worker]\nmax_batchh = 3\n', "unknown setting(s) worker.max_batchh"),
                           ('[engine.whisper]\nx = 1\n', "unknown setting(s) engine.whisper"),
                           ('[worker]\nmax_batch = "many"\n', "max_batch must be an integer")):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config({}, {}, path)
        assert fragment in str(info.value)


def test_reuse_port_is_an_internal_switch_not_a_setting(monkeypatch, capsys):
    """--processes starts its children with --reuse-port; it is no user setting (no table row, no
    environment name, not in --help), but it still reaches the server."""
    assert "reuse_port" not in BY_KEY
    assert _serve_and_capture(["--reuse-port"], monkeypatch)["settings"].reuse_port is True
    assert _serve_and_capture([], monkeypatch)["settings"].reuse_port is False
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    usage = capsys.readouterr().out
    assert "--reuse-port" not in usage
    assert all(s.flag in usage for s in SETTINGS)


def test_transcribe_takes_the_engine_sections_flags(monkeypatch, tmp_path):
    """`transcribe` reads the serve command's engine settings (flags only): the same names, defaults
    and Granite options reach the engine loader."""
    import stream_server.cli as cli

    seen = []

    def load_engine(name, model, device, cpu_threads, max_batch, granite=None, preload_speakers=False):
        seen.append((name, model, device, cpu_threads, max_batch, granite.encoder_batching))
        raise _Captured

    monkeypatch.setattr(cli, "load_engine", load_engine)
    monkeypatch.setenv("GRANITE_STREAM_MAX_BATCH", "99")  # not read by transcribe
    with pytest.raises(_Captured):
        main(["transcribe", str(tmp_path / "a.wav")])
    with pytest.raises(_Captured):
        main(["transcribe", "--engine", "granite", "--model", "/m", "--device", "cpu", "--cpu-threads", "2",
              "--max-batch", "3", "--granite-encoder-batching", "padded", str(tmp_path / "a.wav")])
    assert seen == [("auto", None, "auto", 0, 8, "exact"), ("granite", "/m", "cpu", 2, 3, "padded")]


# ---- each default is written once ------------------------------------------------------------

# Literal defaults (of a parameter or a dataclass field) that may repeat a name a user setting flows
# into, each with the reason it is not the same default. Anything else written twice fails below.
_OTHER_MEANINGS = {
    ("max_batch", "stream_server/server/loopback.py", "1"): "the loopback decodes one request at a time unless asked",
    ("max_inflight", "stream_server/inference/ray_pool.py", "32"): "a gateway built by hand (the pool computes its own)",
    ("device", "stream_server/speakers/encoder.py", "'cpu'"): "the speaker encoder's device, not the engine's",
    ("device", "stream_server/engines/whisper.py", "'cpu'"): "WhisperEngine's own device (load_engine resolves auto)",
    ("device", "stream_server/engines/granite/engine.py", "None"): "GraniteEngine: None picks cuda when present",
    ("device", "stream_server/engines/granite/features.py", "'cpu'"): "the feature extractor's device",
    ("device", "stream_server/cli.py", "None"): "load_configured_engine: None means the section's device",
    ("model", "stream_server/adapters/openai_realtime.py", "'whisper-1'"): "the OpenAI protocol's model name",
    ("gpus_per_replica", "stream_server/inference/ray_pool.py", "None"): "the runtime form of -1 (automatic)",
    ("cpus_per_replica", "stream_server/inference/ray_pool.py", "None"): "the runtime form of 0 (automatic)",
    ("max_inflight", "stream_server/inference/ray_pool.py", "None"): "the runtime form of 0 (automatic)",
    ("model", "stream_server/inference/ray_pool.py", "None"): "the runtime form of the empty setting",
    ("model", "stream_server/engines/__init__.py", "None"): "the runtime form of the empty setting",
    ("model", "stream_server/engines/whisper.py", "None"): "the runtime form of the empty setting",
    ("model", "stream_server/engines/granite/engine.py", "None"): "the runtime form of the empty setting",
    ("cpu_threads", "stream_server/inference/ray_pool.py", "1"): "a replica reserves at least one Ray CPU",
    ("cpu_threads", "stream_server/engines/whisper.py", "0"): "WhisperEngine's own (0: one per core)",
    ("max_batch", "stream_server/engines/__init__.py", "None"): "None: the engine's own bound",
    ("compile_step", "stream_server/engines/granite/decode.py", "False"): "the decoder's bool form",
    ("max_utterance_s", "stream_server/core/events.py", "None"): "VadChange: a client's change, None = not given",
}


def _literal_defaults(root: Path, names: set[str]) -> list[tuple[str, str, str]]:
    """``(name, file, default)`` for every parameter default and dataclass-style class field in the
    product whose name is in ``names`` and whose default is written as a literal (not a reference)."""
    import ast

    def literal(node) -> bool:
        return isinstance(node, ast.Constant) or (isinstance(node, (ast.BinOp, ast.UnaryOp)) and all(
            isinstance(n, (ast.Constant, ast.operator, ast.unaryop, ast.BinOp, ast.UnaryOp)) for n in ast.walk(node)))

    def field_default(node):  # a dataclass field written `field(default=..., metadata=...)` has that default
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
            return next((k.value for k in node.keywords if k.arg == "default"), None)
        return node

    found = []
    for path in sorted((root / "stream_server").rglob("*.py")):
        where = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = node.args.posonlyargs + node.args.args
                pairs += zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults)
                pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
                pairs = [(a.arg, d) for a, d in pairs]
            elif isinstance(node, ast.ClassDef):
                pairs = [(s.target.id, field_default(s.value)) for s in node.body if isinstance(s, ast.AnnAssign)
                         and isinstance(s.target, ast.Name) and s.value is not None]
            found += [(name, where, ast.unparse(value)) for name, value in pairs
                      if name in names and value is not None and literal(value)]
    return found


def test_every_default_is_written_once():
    """A default a user setting feeds is written in one place; the sections, the runtime objects and
    the functions that build them refer to it. Fails when a literal default is added for one of
    those names (``max_batch: int = 8`` in a new class), unless it means something else and says so."""
    import collections

    runtime_names = {"max_wait", "batch_wait_s", "early_final_s", "refresh_waiting_partials", "final_reserve",
                     "target_ongoing_requests", "app_name", "max_retries", "retry_backoff_s", "request_timeout_s",
                     "health_interval_s", "level", "fmt"}
    names = {s.attr for s in SETTINGS} | set(BY_KEY) | runtime_names
    found = _literal_defaults(Path(__file__).parent.parent, names)
    written = collections.defaultdict(list)
    for name, where, value in found:
        if (name, where, value) not in _OTHER_MEANINGS:
            written[name].append(f"{where}: {value}")
    assert {name: places for name, places in written.items() if len(places) > 1} == {}
    stale = set(_OTHER_MEANINGS) - set(found)
    assert not stale, f"no longer written, drop from _OTHER_MEANINGS: {sorted(stale)}"
    # The server holds the network, limits, security, memory and logging sections as they are; the
    # session's bounds in the limits section are the session's own defaults.
    from stream_server.core.session import SessionSettings
    from stream_server.server.app import ServerSettings

    server, session, config = ServerSettings(), SessionSettings(), ServeConfig()
    assert (server.network, server.limits, server.security, server.memory, server.logging) == (
        config.network, config.limits, config.security, config.memory, config.logging)
    assert (config.limits.max_frame_bytes, config.limits.max_session_s, config.limits.max_utterance_s) == (
        session.max_frame_bytes, session.max_session_s, session.limits.max_utterance_s)
    assert server_settings(config) == dataclasses.replace(server, access=server_settings(config).access)


def test_the_default_check_finds_a_second_literal(tmp_path):
    (tmp_path / "stream_server").mkdir()
    (tmp_path / "stream_server" / "a.py").write_text(
        "class A:\n    max_batch: int = 8\n    max_queue: int = B.max_queue\n    max_wait: float = field(default=0.5, metadata={})\n"
        "\ndef f(max_batch=4 * 2, *, max_queue=-1):\n    pass\n")
    assert _literal_defaults(tmp_path, {"max_batch", "max_queue", "max_wait"}) == [
        ("max_batch", "stream_server/a.py", "8"), ("max_wait", "stream_server/a.py", "0.5"),
        ("max_batch", "stream_server/a.py", "4 * 2"), ("max_queue", "stream_server/a.py", "-1")]
