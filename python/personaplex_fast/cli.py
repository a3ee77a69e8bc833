"""`personaplex-fast`: the one command-line entry point."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import UserError


class _Help(argparse.HelpFormatter):
    """--help shows every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == []
                     or action.default is argparse.SUPPRESS)
        if action.option_strings and "%(default)" not in text and shown:
            text += f"{' ' if text else ''}(default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit status 2, like every other user error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(kind, low):
    """An argparse type: a number of `kind` that is at least `low`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not value >= low:  # also NaN
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} must be {noun} of at least {low}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _check_output(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    p = Path(path).expanduser()
    folder = p.parent
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write there (permission denied)")


def _check_mlx() -> None:
    """MLX without a backend (plain `pip install .` on Linux) fails at its first import."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"MLX cannot load its backend ({first}): install the extra for this machine, "
                        "pip install \".[cpu]\" (Linux, CPU) or \".[cuda]\" (Linux, NVIDIA GPU)") from None


def _make_tiny(args) -> None:
    from .tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed)
    print(f"wrote a tiny random checkpoint to {path}")


def _convert(args) -> None:
    import mlx.core as mx

    from .convert import convert

    dtype = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32, None: None}[args.dtype]
    path = convert(args.src, args.dst, q_bits=args.q_bits, group_size=args.group_size, dtype=dtype)
    print(f"wrote {path}")


def _lm_run(args) -> None:
    from . import ops
    from .lmrun import run

    ops.set_kernels(args.kernels)
    run(args.model, frames=args.frames, seed=args.seed, greedy=args.greedy, batch=args.batch, kv_bits=args.kv_bits)


def _selftest(args) -> None:
    from . import selftest

    shapes = selftest.tiny_shapes(args.batch) if args.tiny else selftest.default_shapes(args.batch)
    results = selftest.run(shapes)
    print(selftest.table(results, shapes))
    if not all(r.ok for r in results):
        raise SystemExit(1)


def _bench(args) -> None:
    from . import ops
    from .benchmark import bench

    if args.batch < 1 or args.ticks < 1 or args.warmup < 0:
        raise UserError("--batch and --ticks must be positive, --warmup not negative")
    ops.set_kernels(args.kernels)
    bench(args.model, q_bits=args.q_bits, batch=args.batch, ticks=args.ticks, warmup=args.warmup, tiny=args.tiny,
          json_path=args.json)


def sampling_from(args):
    from .sampling import SamplingConfig

    return SamplingConfig(temp_text=args.temp_text, topk_text=args.topk_text,
                          temp_audio=args.temp_audio, topk_audio=args.topk_audio, greedy=args.greedy)


def _add_model_args(s) -> None:
    s.add_argument("--model", required=True,
                   help="HF repo name (nvidia/personaplex-7b-v1), checkpoint or converted directory")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    s.add_argument("--temp-text", type=_at_least(float, 0), default=0.7, help="text temperature (0: argmax)")
    s.add_argument("--topk-text", type=_at_least(int, 1), default=25, help="text tokens sampled from")
    s.add_argument("--temp-audio", type=_at_least(float, 0), default=0.8, help="audio temperature (0: argmax)")
    s.add_argument("--topk-audio", type=_at_least(int, 1), default=250, help="audio codes sampled from")
    s.add_argument("--reference", action="store_true", help="run every op through its pure-MLX reference")
    s.add_argument("--check", action="store_true",
                   help="run fused and reference ops on the same inputs and report the largest difference")
    _add_kernels_arg(s)
    _add_kv_bits_arg(s)


def _add_kv_bits_arg(s) -> None:
    s.add_argument("--kv-bits", type=int, choices=(8,), default=None,
                   help="8: keep the temporal transformer's KV cache in 8 bits (int8, a scale per row): half "
                        "the memory a session holds, twice the sessions (default: the model's dtype)")


def _add_kernels_arg(s) -> None:
    s.add_argument("--kernels", choices=("auto", "fused", "reference"), default="auto",
                   help="auto: each fused primitive where it passed the self-test on this device (GPUs: run "
                        "once, cached), else its pure-MLX reference; fused: all fused, untested; reference: "
                        "all pure MLX (default: %(default)s)")


def _set_ops_mode(args) -> None:
    from . import ops

    ops.set_mode("check" if args.check else "reference" if args.reference else "fused")
    ops.set_kernels(args.kernels)


def _report_check(args) -> None:
    if args.check:
        from . import ops

        for name, diff in sorted(ops.check_report().items()):
            print(f"check: {name}: largest |fused - reference| = {diff:.3g}")


def _offline(args) -> None:
    from .audio import read_audio
    from .loading import load_model
    from .offline import offline

    _check_output(args.output_wav, "--output-wav")
    _check_output(args.output_text, "--output-text")
    pcm = read_audio(args.input_wav, max_seconds=args.max_input_seconds, limit=" (--max-input-seconds)")
    _set_ops_mode(args)
    model = load_model(args.model)
    sampling = sampling_from(args)
    engine = model.engine(slots=1, sampling=sampling, seed=args.seed, kv_bits=args.kv_bits)
    prompt = model.prompt(args.voice_prompt, args.text_prompt, seed=args.seed, sampling=sampling)
    took = offline(engine, pcm, args.output_wav, args.output_text, decode=model.decode_text, prompt=prompt)
    seconds = len(pcm) / engine.mimi.cfg.sample_rate
    print(f"wrote {args.output_wav} and {args.output_text}: {seconds:.1f} s of audio in {took:.1f} s, "
          f"real-time factor {took / seconds:.2f} ({seconds / took:.1f}x real time)")
    _report_check(args)


def _chat(args) -> None:
    from .chat import chat
    from .loading import load_model

    if args.record:
        _check_output(args.record, "--record")
    _set_ops_mode(args)
    model = load_model(args.model)
    sampling = sampling_from(args)
    engine = model.engine(slots=1, sampling=sampling, seed=args.seed, kv_bits=args.kv_bits)
    prompt = model.prompt(args.voice_prompt, args.text_prompt, seed=args.seed, sampling=sampling)
    chat(engine, model.decode_text, input_device=args.input_device, output_device=args.output_device,
         seconds=args.seconds, prompt=prompt, aec=args.aec, noise_suppression=args.noise_suppression,
         record=args.record)
    _report_check(args)


def serve_limits(args):
    from .admission import Limits

    for name, value in vars(args).items():
        if name.startswith(("max_", "handshake_", "idle_")) and value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be positive")
    return Limits(max_prompt_tokens=args.max_prompt_tokens, max_connections=args.max_connections,
                  max_handshakes=args.max_handshakes, handshake_timeout_s=args.handshake_timeout,
                  idle_timeout_s=args.idle_timeout)


def _serve(args) -> None:
    from .loading import load_model
    from .server import serve

    if args.replicas is not None:
        return _serve_cluster(args)
    _set_ops_mode(args)
    limits = serve_limits(args)
    serve(load_model(args.model), args.host, args.port, args.max_sessions, sampling=sampling_from(args),
          seed=args.seed, limits=limits, allow_origins=tuple(args.allow_origin), token=args.token,
          ssl_cert=args.ssl_cert, ssl_key=args.ssl_key, static=args.static, kv_bits=args.kv_bits)


def _serve_cluster(args) -> None:
    import os

    # Ray reads these as it starts: no usage report leaves the machine, and the replicas'
    # log lines reach this terminal as they are written, not deduplicated.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if args.address is None:
        # A cluster of this host alone: Ray's single-machine mode keeps it on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from . import cluster
    except ImportError as e:
        raise UserError(f"--replicas needs Ray Serve ({e.name} is missing): "
                        "pip install 'personaplex-fast[cluster]'") from None
    cluster.run(args)


def build_parser() -> argparse.ArgumentParser:
    from .admission import Limits
    from .offline import MAX_INPUT_SECONDS

    p = _Parser(prog="personaplex-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official format")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    s.set_defaults(func=_make_tiny)

    s = sub.add_parser("convert", help="official checkpoint -> MLX-ready directory")
    s.add_argument("src", help="HF repo name, checkpoint directory or model.safetensors")
    s.add_argument("dst")
    s.add_argument("--q-bits", type=int, choices=(4, 8), default=None,
                   help="quantize the linear layers to 4 or 8 bits (default: keep the checkpoint's precision)")
    s.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64,
                   help="weights per quantization scale")
    s.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="cast unquantized weights (default: keep the checkpoint's)")
    s.set_defaults(func=_convert)

    s = sub.add_parser("offline", help="a conversation from a wav file: model audio + transcript")
    _add_model_args(s)
    s.add_argument("--input-wav", required=True)
    s.add_argument("--output-wav", required=True)
    s.add_argument("--output-text", required=True, help="json: text tokens with their frame times")
    s.add_argument("--voice-prompt", default=None,
                   help="packaged voice (NATF0-3, NATM0-3, VARF0-4, VARM0-4) or a wav/.pt file")
    s.add_argument("--text-prompt", default=None, help="role prompt, wrapped in <system> tags")
    s.add_argument("--max-input-seconds", type=_at_least(float, 0.08), default=MAX_INPUT_SECONDS,
                   help="refuse a longer input (default: %(default)g)")
    s.set_defaults(func=_offline)

    s = sub.add_parser("lm-run", help="step the language model on silence and time it")
    s.add_argument("--model", required=True, help="HF repo name or local checkpoint")
    s.add_argument("--frames", type=_at_least(int, 1), default=100, help="steps to run")
    s.add_argument("--batch", type=_at_least(int, 1), default=1, help="sessions stepped together")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    _add_kernels_arg(s)
    _add_kv_bits_arg(s)
    s.set_defaults(func=_lm_run)

    s = sub.add_parser("selftest", help="each fused primitive against its pure-MLX reference on this device, "
                                        "at the model's shapes on random inputs: prints a table, exits 1 on a failure")
    s.add_argument("--tiny", action="store_true", help="the tiny model's shapes (quick; CI runs it on the CPU)")
    s.add_argument("--batch", type=int, default=1, help="sessions per step (default: %(default)s)")
    s.set_defaults(func=_selftest)

    s = sub.add_parser("bench", help="time the whole tick on this machine, fused and pure MLX side by side")
    s.add_argument("--model", default=None,
                   help="HF repo name, checkpoint or converted directory (default: random weights of the "
                        "official 7B shape)")
    s.add_argument("--q-bits", type=int, choices=(4, 8), default=None,
                   help="quantize the LM's linears (group 64) as convert does (4: the advice for <= 32 GB)")
    s.add_argument("--batch", type=int, default=1, help="sessions per tick (default: %(default)s)")
    s.add_argument("--ticks", type=int, default=60, help="consecutive ticks timed (default: %(default)s)")
    s.add_argument("--warmup", type=int, default=10, help="ticks run first, untimed (default: %(default)s)")
    s.add_argument("--tiny", action="store_true", help="random weights of the tiny model (quick; CI runs it)")
    s.add_argument("--json", default=None, help="also write the results here")
    s.add_argument("--kernels", choices=("auto", "fused"), default="auto",
                   help="the fused column: auto (where the self-test passed) or all fused (default: %(default)s)")
    s.set_defaults(func=_bench)

    s = sub.add_parser("chat", help="a live conversation through the microphone and speaker")
    _add_model_args(s)
    s.add_argument("--input-device", help="PortAudio device index or name substring (default: the system's)")
    s.add_argument("--output-device", help="PortAudio device index or name substring (default: the system's)")
    s.add_argument("--seconds", type=float, default=None, help="stop after this much audio (default: Ctrl-C)")
    s.add_argument("--voice-prompt", default=None,
                   help="packaged voice (NATF0-3, NATM0-3, VARF0-4, VARM0-4) or a wav/.pt file")
    s.add_argument("--text-prompt", default=None, help="role prompt, wrapped in <system> tags")
    s.add_argument("--aec", choices=("auto", "on", "off"), default="auto",
                   help="echo cancellation (WebRTC AEC3); auto: on unless a device is named as a headset. "
                        "off with headphones: it saves ~10 ms")
    s.add_argument("--noise-suppression", action="store_true", help="WebRTC noise suppression on the microphone")
    s.add_argument("--record", metavar="WAV", default=None,
                   help="write 24 kHz channels: microphone, echo reference, what the model heard")
    s.set_defaults(func=_chat)

    s = sub.add_parser("serve", help="a web page for live conversations, all sessions batched on one engine")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8998, help="0: any free port (printed at start)")
    s.add_argument("--max-sessions", type=int, default=None,
                   help="engine slots: concurrent conversations (default: as many as the free memory holds, at "
                        "most 64 on a GPU, 4 on the CPU; printed at start)")
    s.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="a page origin (https://host:port) allowed to open sessions besides the server's own; "
                        "repeatable")
    s.add_argument("--token", default=None,
                   help="require ?token=TOKEN on websockets and /api/ (open the page as /?token=TOKEN)")
    s.add_argument("--ssl-cert", default=None, help="serve HTTPS/WSS with this certificate (PEM)")
    s.add_argument("--ssl-key", default=None, help="the certificate's private key (PEM)")
    s.add_argument("--static", metavar="DIR", default=None,
                   help="serve this folder at / (a client bundle, such as the unpacked official dist; 'ours': "
                        "this package's page); default: the model's dist.tgz when it has one, else ours")
    d = Limits()
    s.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longest role prompt in tokens (default: %(default)s; frames: the model's context)")
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open sockets at most (default: %(default)s)")
    s.add_argument("--max-handshakes", type=int, default=d.max_handshakes,
                   help="sockets not yet in a session at most (default: %(default)s)")
    s.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout_s,
                   help="seconds for TLS, an HTTP request, a START (default: %(default)g)")
    s.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help="seconds a session may send no audio (default: %(default)g)")
    c = s.add_argument_group("distributed mode (Ray Serve; pip install 'personaplex-fast[cluster]')")
    c.add_argument("--replicas", type=int, default=None,
                   help="serve through Ray Serve: N replicas, each one GPU (or the CPU) and --max-sessions slots")
    c.add_argument("--address", default=None,
                   help="a running Ray cluster to deploy onto ('auto': this host's); default: start one here")
    c.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus port of the Ray cluster started here (default: Ray picks one)")
    c.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default: 1 where MLX has CUDA, else 0: one CPU each)")
    s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        _check_mlx()  # first: the parser's defaults come from modules that import MLX
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        print(f"personaplex-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
