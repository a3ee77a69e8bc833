"""`personaplex-fast`: the one command-line entry point."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


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
    from .lmrun import run

    run(args.model, frames=args.frames, seed=args.seed, greedy=args.greedy, batch=args.batch)


def _sampling(args):
    from .sampling import SamplingConfig

    return SamplingConfig(temp_text=args.temp_text, topk_text=args.topk_text,
                          temp_audio=args.temp_audio, topk_audio=args.topk_audio, greedy=args.greedy)


def _add_model_args(s) -> None:
    s.add_argument("--model", required=True,
                   help="HF repo name (nvidia/personaplex-7b-v1), checkpoint or converted directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    s.add_argument("--temp-text", type=float, default=0.7)
    s.add_argument("--topk-text", type=int, default=25)
    s.add_argument("--temp-audio", type=float, default=0.8)
    s.add_argument("--topk-audio", type=int, default=250)
    s.add_argument("--reference", action="store_true", help="run every op through its pure-MLX reference")
    s.add_argument("--check", action="store_true",
                   help="run fused and reference ops on the same inputs and report the largest difference")


def _set_ops_mode(args) -> None:
    from . import ops

    ops.set_mode("check" if args.check else "reference" if args.reference else "fused")


def _report_check(args) -> None:
    if args.check:
        from . import ops

        for name, diff in sorted(ops.check_report().items()):
            print(f"check: {name}: largest |fused - reference| = {diff:.3g}")


def _offline(args) -> None:
    from .loading import load_model
    from .offline import offline

    _set_ops_mode(args)
    model = load_model(args.model)
    sampling = _sampling(args)
    engine = model.engine(slots=1, sampling=sampling, seed=args.seed)
    prompt = model.prompt(args.voice_prompt, args.text_prompt, seed=args.seed, sampling=sampling)
    offline(engine, args.input_wav, args.output_wav, args.output_text, decode=model.decode_text,
            prompt=prompt, max_seconds=args.max_input_seconds)
    print(f"wrote {args.output_wav} and {args.output_text}")
    _report_check(args)


def _chat(args) -> None:
    from .chat import chat
    from .loading import load_model

    _set_ops_mode(args)
    model = load_model(args.model)
    sampling = _sampling(args)
    engine = model.engine(slots=1, sampling=sampling, seed=args.seed)
    prompt = model.prompt(args.voice_prompt, args.text_prompt, seed=args.seed, sampling=sampling)
    chat(engine, model.decode_text, input_device=args.input_device, output_device=args.output_device,
         seconds=args.seconds, prompt=prompt, aec=args.aec, noise_suppression=args.noise_suppression,
         record=args.record)
    _report_check(args)


def _serve(args) -> None:
    from .admission import Limits
    from .loading import load_model
    from .server import serve

    _set_ops_mode(args)
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_connections=args.max_connections,
                    max_handshakes=args.max_handshakes, handshake_timeout_s=args.handshake_timeout,
                    idle_timeout_s=args.idle_timeout)
    for name, value in vars(args).items():
        if name.startswith(("max_", "handshake_", "idle_")) and value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be positive")
    serve(load_model(args.model), args.host, args.port, args.max_sessions, sampling=_sampling(args),
          seed=args.seed, limits=limits, allow_origins=tuple(args.allow_origin), token=args.token,
          ssl_cert=args.ssl_cert, ssl_key=args.ssl_key, static=args.static)


def build_parser() -> argparse.ArgumentParser:
    from .admission import Limits
    from .offline import MAX_INPUT_SECONDS

    p = argparse.ArgumentParser(prog="personaplex-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official format")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_make_tiny)

    s = sub.add_parser("convert", help="official checkpoint -> MLX-ready directory")
    s.add_argument("src", help="HF repo name, checkpoint directory or model.safetensors")
    s.add_argument("dst")
    s.add_argument("--q-bits", type=int, choices=(4, 8), default=None)
    s.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
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
    s.add_argument("--max-input-seconds", type=float, default=MAX_INPUT_SECONDS,
                   help="refuse a longer input (default: %(default)g)")
    s.set_defaults(func=_offline)

    s = sub.add_parser("lm-run", help="step the language model on silence and time it")
    s.add_argument("--model", required=True, help="HF repo name or local checkpoint")
    s.add_argument("--frames", type=int, default=100)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--greedy", action="store_true")
    s.set_defaults(func=_lm_run)

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
    s.add_argument("--max-sessions", type=int, default=4, help="engine slots: concurrent conversations")
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
    s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"personaplex-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
