"""The bench measures the product's own path: ``granite-stream serve`` with its defaults."""

import dataclasses

from benchmarks.cli import build_parser
from benchmarks.servers import serve_command
from stream_server.cli import build_parser as serve_parser
from stream_server.settings import cli_values, load_config


def _serve_config(cmd: list[str]):
    return load_config(cli_values(serve_parser().parse_args(cmd[cmd.index("serve"):])), env={})


def test_the_bench_starts_serve_with_its_defaults():
    args = build_parser().parse_args([])
    assert args.server == "subprocess"
    cmd = serve_command(4321, engine=args.engine, model=args.model, cpu_threads=args.cpu_threads,
                        max_batch=args.max_batch, device=args.device, early_final_ms=args.early_final_ms,
                        partial_refresh=args.partial_refresh)
    config, defaults = _serve_config(cmd), load_config({}, env={})
    # Only what a load test must differ in (one client IP), the port, the log level, and the
    # engine named (the bench's references need to know it; serve's "auto" is Whisper without a GPU).
    assert config == dataclasses.replace(
        defaults,
        network=dataclasses.replace(defaults.network, port=4321),
        limits=dataclasses.replace(defaults.limits, max_sessions_per_ip=4096),
        engine=dataclasses.replace(defaults.engine, name="whisper"),
        logging=dataclasses.replace(defaults.logging, log_level="WARNING"),
    )


def test_bench_flags_reach_serve():
    args = build_parser().parse_args(["--max-batch", "4", "--early-final-ms", "0", "--partial-refresh", "off",
                                      "--cpu-threads", "1"])
    config = _serve_config(serve_command(4321, max_batch=args.max_batch, early_final_ms=args.early_final_ms,
                                         partial_refresh=args.partial_refresh, cpu_threads=args.cpu_threads,
                                         realtime_factor=0))
    assert config.worker.max_batch == 4 and config.session.early_final_ms == 0
    assert config.session.partial_refresh == "off" and config.engine.cpu_threads == 1
    assert config.limits.realtime_factor == 0
