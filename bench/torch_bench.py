"""PyTorch side of the GPU benchmark: Kyutai's official `moshi` at the PersonaPlex 7B shapes.

Run on a CUDA machine: `python bench/torch_bench.py --json OUT.json [--batches 1,8,32]
[--context 3000]`, or call `measure(...)`. moshi is not installed there:
`bench/pack_torch_deps.sh` copies it into `.dev-torch/`, which this file puts first on
sys.path. Models are built from moshi's own loader kwargs (models/loaders.py: `_lm_kwargs`,
`_mimi_config`) with random weights: the LM in bf16, in place on the GPU; Mimi in float32, as
moshi's server runs it. `context` frames are put in every KV cache without stepping them
(fill_context). A row is the median host wall time of `iters` calls, each between two
torch.cuda.synchronize(), after warm-up:

  matvec       F.linear of [B, K] by the 7B's qkv, out, gated-FFN in and out weights
  attention    F.scaled_dot_product_attention, one query over the 3000-slot KV (no mask, and
               the boolean mask moshi always passes)
  temporal     StreamingTransformer.forward, the 32 layers, one step
  forward_text LMModel.forward_text: 17 embeddings + temporal + text head (LMGen's graphed_main)
  depformer    LMGen.depformer_step: the dep_q codebooks with their sampling (graphed_depth)
  lm_step      LMGen.step: the above, the text sampling and LMGen's token bookkeeping
  mimi_encode  MimiModel.encode of one 80 ms frame (1920 samples) per session, streaming
  mimi_decode  MimiModel.decode of one frame of codes per session, streaming
  frame        mimi.encode + lm_gen.step + mimi.decode

matvec to depformer are timed as one torch.cuda.CUDAGraph replay each; lm_step, mimi_* and
frame call moshi's streaming API, which CUDA-graphs its own pieces (utils/compile.py,
CUDAGraphed), as moshi's server does. On CUDA moshi torch.compiles its RMSNorm, RoPE and
gated FFN, as its server does; rows that fail compiled are rerun without (compile_error).

JSON (and measure()'s return): {"info": one line (versions, device, graphs, compile),
"rows": {key: {"B": ms, or "error: ..."}}, the view bench/gpu_bench.py merges, keyed
("matvec qkv 4096->12288 bf16", "attention", "attention bool mask", "temporal bf16",
"forward_text bf16", "depformer bf16", "lm_step bf16", "mimi_encode", "mimi_decode",
"frame bf16"), "meta": {torch, cuda, moshi, python, device, dtype, mimi_dtype, context,
kv_slots, iters, warmup, graphs, compile, compile_error, stubbed, tiny, date, lm_config,
mimi_config}, "records": [{name, case, B, ms, min_ms, bytes, peak_gb, api, timing, compiled,
compile_error, error}]}. The exit status is 1 when any row failed; the JSON is complete
either way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

_DEPS = Path(__file__).resolve().parents[1] / ".dev-torch"
if _DEPS.is_dir() and str(_DEPS) not in sys.path:
    sys.path.insert(0, str(_DEPS))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTIONS = ("matvec", "attention", "temporal", "depformer", "lm_step", "mimi_encode", "mimi_decode",
            "frame")
WARMUP = 5  # moshi's CUDAGraphed runs once eagerly, captures on the second call

# Tiny sizes for the CPU test: the official layout (16 streams, 8 generated, the same delays,
# weights per depformer step, Mimi's strides and frame rate), every width shrunk.
TINY_LM = dict(dim=64, num_heads=4, num_layers=2, text_card=64, card=32, context=16,
               depformer_dim=32, depformer_num_heads=2, depformer_num_layers=2,
               depformer_dim_feedforward=int(4.125 * 32))
TINY_MIMI = dict(seanet=dict(dimension=32, n_filters=4),
                 quantizer=dict(dimension=16, n_q=8, bins=32, input_dimension=32, output_dimension=32),
                 transformer=dict(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64,
                                  input_dimension=32, output_dimensions=[32]))


def import_moshi() -> tuple[types.SimpleNamespace, list[str]]:
    """moshi's modules, and the names of the packages replaced by stubs.

    moshi.models imports huggingface_hub, safetensors and sentencepiece at module level for
    checkpoint download and the text tokenizer, none of which the bench uses; where one of
    them does not import, all three are stubbed rather than carried (two are compiled).
    """
    try:
        import moshi.models.loaders  # noqa: F401
    except Exception:  # ImportError, or a newer huggingface_hub failing in its own way
        for name in [n for n in sys.modules if n == "moshi" or n.startswith("moshi.")]:
            del sys.modules[name]
        _install_stubs()
    stubbed = sorted(n for n, mod in list(sys.modules.items())
                     if isinstance(mod, types.ModuleType) and vars(mod).get("_torch_bench_stub") is True)
    try:
        import moshi
        from moshi.models import loaders
        from moshi.models.lm import LMGen
        from moshi.modules.gating import make_gating
        from moshi.utils import compile as compile_utils
    except ImportError as e:
        raise SystemExit(f"torch_bench: cannot import moshi ({e}); run bench/pack_torch_deps.sh "
                         f"where moshi is installed and carry .dev-torch/ here") from None
    return types.SimpleNamespace(version=moshi.__version__, loaders=loaders, LMGen=LMGen,
                                 make_gating=make_gating, compile=compile_utils), stubbed


def _install_stubs() -> None:
    def unused(*args, **kwargs):
        raise RuntimeError("torch_bench: stubbed out, the bench loads no checkpoint")

    stubs = {
        "huggingface_hub": dict(hf_hub_download=unused),
        "huggingface_hub.errors": dict(EntryNotFoundError=type("EntryNotFoundError", (Exception,), {})),
        "safetensors": {},
        "safetensors.torch": dict(load_file=unused),
        "sentencepiece": dict(SentencePieceProcessor=unused),
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name, "torch_bench stub: moshi imports it, the bench never uses it")
        module.__dict__.update(attrs, _torch_bench_stub=True)
        sys.modules[name] = module


def configs(m, tiny: bool) -> tuple[dict, dict]:
    """The LM kwargs and Mimi config of moshi's loaders (the 7B ones), or their tiny versions."""
    lm = dict(m.loaders._lm_kwargs)
    mimi = copy.deepcopy(m.loaders._mimi_config)
    if tiny:
        lm.update(TINY_LM)
        for part, values in TINY_MIMI.items():
            mimi[part].update(values)
    return lm, mimi


def fill_context(transformer, context: int, kv=None) -> None:
    """Put a streaming StreamingTransformer where it would be after `context` steps.

    Each attention layer's RingKVCache (capacity = the model's context) gets its write
    offsets and RoPE positions set to `context`, and its K/V from `kv` (a per-layer list of
    [2, B, H, capacity, D] caches, taken from a real prefill by the test) or random values.
    The next step then writes slot `context % capacity` and attends to every valid slot,
    exactly as after stepping `context` frames.
    """
    for i, layer in enumerate(transformer.layers):
        attn = layer.self_attn._streaming_state
        if kv is None:
            attn.kv_cache.cache.normal_()
        else:
            attn.kv_cache.cache.copy_(kv[i])
        attn.kv_cache.end_offset.fill_(context)
        attn.offset.fill_(context)
        attn.offset_cpu = context
        layer._streaming_state.offset_cpu = context
    transformer._streaming_state.offsets.fill_(context)


def temporal_step(transformer, x):
    """One streaming step of the temporal transformer on x [B, 1, dim] (what the bench times)."""
    return lambda: transformer(x)


class Bench:
    """The models, inputs and settings shared by the sections; each model is built once."""

    def __init__(self, m, device, dtype, mimi_dtype, context, iters, tiny, graphs, compile):
        self.m, self.device, self.dtype, self.mimi_dtype = m, device, dtype, mimi_dtype
        self.context, self.iters, self.graphs, self.compile = context, iters, graphs, compile
        self.lm_kwargs, self.mimi_config = configs(m, tiny)
        self._built: dict = {}
        # How a row is timed: one CUDA graph of the whole call, or moshi's own graphed pieces.
        self.own = "CUDAGraph replay" if graphs else "eager"
        self.moshi = "moshi CUDAGraphed" if graphs else "eager"

    def _once(self, key, build):
        if key not in self._built:
            try:
                self._built[key] = (build(), None)
            except Exception as e:
                # Only its text is kept: the traceback would hold a half-built model's memory.
                self._built[key] = (None, _describe(e))
        value, error = self._built[key]
        if error is not None:
            raise RuntimeError(f"building {key} failed: {error}")
        return value

    def lm(self):
        # Built in place on the device (moshi's LMModel takes device=), never on the CPU first.
        return self._once("LMModel", lambda: self.m.loaders.get_moshi_lm(
            None, lm_kwargs=self.lm_kwargs, device=self.device, dtype=self.dtype))

    def lm_gen(self):
        return self._once("LMGen", lambda: self.m.LMGen(self.lm()))

    def mimi(self):
        # ~80M parameters: built on the CPU by moshi's get_mimi, then moved.
        return self._once("MimiModel", lambda: self.m.loaders.get_mimi(
            None, self.mimi_config, device=self.device).to(self.mimi_dtype))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> tuple[float, float]:
        """Median and min ms of fn() over self.iters calls, synchronized on both sides."""
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(self.iters):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times), 1e3 * min(times)

    def graphed(self, fn):
        """fn itself, or the replay of one CUDA graph of it (inputs: the tensors fn closes over)."""
        if not self.graphs:
            return fn
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    def moshi_graphs(self):
        """moshi's own CUDAGraphed pieces (the server's way), or none of them."""
        return contextlib.nullcontext() if self.graphs else self.m.compile.no_cuda_graph()

    def tokens(self, shape, high):
        return torch.randint(0, high, shape, device=self.device)

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, device=self.device, dtype=dtype or self.dtype)


def matvec_rows(b: Bench, B: int):
    kw = b.lm_kwargs
    dim = kw["dim"]
    ffn = b.m.make_gating(kw["gating"], dim, int(kw["hidden_scale"] * dim), device="meta")
    cases = {"qkv": (dim, 3 * dim), "out": (dim, dim),
             "ffn_in": tuple(ffn.linear_in.weight.shape[::-1]),
             "ffn_out": tuple(ffn.linear_out.weight.shape[::-1])}
    for case, (k, n) in cases.items():
        w, x = b.randn(n, k), b.randn(B, k)
        yield dict(case=f"{case} {k}->{n}", api="F.linear", timing=b.own, bytes=2 * (n * k + B * (k + n)),
                   time=lambda: b.time(b.graphed(lambda: F.linear(x, w))))


def attention_rows(b: Bench, B: int):
    kw = b.lm_kwargs
    H, D, W = kw["num_heads"], kw["dim"] // kw["num_heads"], kw["context"]
    q, k, v = b.randn(B, H, 1, D), b.randn(B, H, W, D), b.randn(B, H, W, D)
    # moshi always passes a boolean mask (ring positions, causality, window): no flash kernel.
    mask = torch.ones(B, 1, 1, W, dtype=torch.bool, device=b.device)
    for case, m in (("no mask", None), ("bool mask", mask)):
        yield dict(case=f"{case} H={H} D={D} W={W}", api="F.scaled_dot_product_attention", timing=b.own,
                   bytes=2 * 2 * B * H * W * D,
                   time=lambda: b.time(b.graphed(lambda: F.scaled_dot_product_attention(q, k, v, m))))


def temporal_rows(b: Bench, B: int):
    lm = b.lm()
    with lm.streaming(B):
        fill_context(lm.transformer, b.context)
        x = b.randn(B, 1, lm.dim)
        yield dict(name="temporal", api="StreamingTransformer.forward", timing=b.own,
                   time=lambda: b.time(b.graphed(temporal_step(lm.transformer, x))))

        def forward_text():
            codes = torch.cat([b.tokens((B, 1, 1), lm.text_card), b.tokens((B, lm.n_q, 1), lm.card)], 1)
            return b.time(b.graphed(lambda: lm.forward_text(codes)))

        yield dict(name="forward_text", api="LMModel.forward_text", timing=b.own, time=forward_text)


def depformer_rows(b: Bench, B: int):
    gen = b.lm_gen()
    text, h = b.tokens((B,), gen.lm_model.text_card), b.randn(B, 1, gen.lm_model.dim)
    yield dict(case=f"dep_q={gen.lm_model.dep_q}", api="LMGen.depformer_step", timing=b.own,
               time=lambda: b.time(b.graphed(lambda: gen.depformer_step(text, h))))


def lm_step_rows(b: Bench, B: int):
    gen = b.lm_gen()
    user = b.tokens((B, gen.lm_model.n_q - gen.lm_model.dep_q, 1), gen.lm_model.card)
    with b.moshi_graphs(), gen.streaming(B):
        fill_context(gen.lm_model.transformer, b.context)
        yield dict(api="LMGen.step", timing=b.moshi, time=lambda: b.time(lambda: gen.step(user)))


def mimi_encode_rows(b: Bench, B: int):
    mimi = b.mimi()
    pcm = 0.1 * b.randn(B, 1, mimi.frame_size, dtype=b.mimi_dtype)
    with b.moshi_graphs(), mimi.streaming(B):
        yield dict(api="MimiModel.encode", timing=b.moshi, time=lambda: b.time(lambda: mimi.encode(pcm)))


def mimi_decode_rows(b: Bench, B: int):
    mimi = b.mimi()
    codes = b.tokens((B, mimi.num_codebooks, 1), mimi.cardinality)
    with b.moshi_graphs(), mimi.streaming(B):
        yield dict(api="MimiModel.decode", timing=b.moshi, time=lambda: b.time(lambda: mimi.decode(codes)))


def frame_rows(b: Bench, B: int):
    mimi, gen = b.mimi(), b.lm_gen()
    pcm = 0.1 * b.randn(B, 1, mimi.frame_size, dtype=b.mimi_dtype)

    def frame():
        out = gen.step(mimi.encode(pcm))
        if out is not None:  # the first max_delay frames have no output yet (warm-up only)
            mimi.decode(out[:, 1:])

    with b.moshi_graphs(), mimi.streaming(B), gen.streaming(B):
        fill_context(gen.lm_model.transformer, b.context)
        yield dict(api="MimiModel.encode + LMGen.step + MimiModel.decode", timing=b.moshi,
                   time=lambda: b.time(frame))


ROWS = {"matvec": matvec_rows, "attention": attention_rows, "temporal": temporal_rows,
        "depformer": depformer_rows, "lm_step": lm_step_rows, "mimi_encode": mimi_encode_rows,
        "mimi_decode": mimi_decode_rows, "frame": frame_rows}


def table_key(record: dict, fmt: str) -> str:
    """A record's key in the result's "rows", as bench/gpu_bench.py looks it up."""
    name, case = record["name"], record["case"] or ""
    if name == "matvec":
        return f"matvec {case} {fmt}"  # e.g. "matvec qkv 4096->12288 bf16"
    if name == "attention":
        return "attention bool mask" if case.startswith("bool mask") else "attention"
    return name if name.startswith("mimi") else f"{name} {fmt}"


def _result(meta: dict, records: list[dict]) -> dict:
    fmt = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(meta["dtype"], meta["dtype"])
    rows: dict = {}
    for r in records:
        value = r["ms"] if r["error"] is None else f"error: {r['error']}"
        rows.setdefault(table_key(r, fmt), {})[str(r["B"])] = value
    info = (f"torch {meta['torch']} (CUDA {meta['cuda']}), moshi {meta['moshi']}, {meta['device']}, "
            f"CUDA graphs {'on' if meta['graphs'] else 'off'}, torch.compile "
            f"{'on' if meta['compile'] else 'off'}, LM {meta['dtype']}, Mimi {meta['mimi_dtype']}, "
            f"context {meta['context']}")
    return dict(info=info, meta=meta, rows=rows, records=records)


def _describe(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:400]}"


def _row(name: str, B: int) -> dict:
    return dict(name=name, case=None, B=B, ms=None, min_ms=None, bytes=None, peak_gb=None,
                api=None, timing=None, compiled=None, compile_error=None, error=None)


def _run_section(b: Bench, section: str, B: int, compiled: bool):
    """The section's rows at batch B. A row's own setup runs inside its `time`, so an error
    outside it (building the model, entering streaming) is the section's: one error row."""
    try:
        for spec in ROWS[section](b, B):
            row = {**_row(section, B), **spec, "compiled": compiled}
            del row["time"]
            if b.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(b.device)
            try:
                row["ms"], row["min_ms"] = spec["time"]()
            except Exception as e:
                row["error"] = _describe(e)
            if b.device.type == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated(b.device) / 1e9
            yield row
    except Exception as e:
        yield dict(_row(section, B), error=_describe(e))
    finally:
        gc.collect()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()


def _section(b: Bench, section: str, B: int) -> list[dict]:
    """_run_section, and once more without torch.compile (fresh streaming state, so no half
    captured graph of moshi's survives) for the rows that failed other than by running out
    of memory; those keep the first error as compile_error."""
    rows = list(_run_section(b, section, B, b.compile))
    failed = {(r["name"], r["case"]): r["error"] for r in rows
              if r["error"] and not r["error"].startswith("OutOfMemoryError")}
    if not (b.compile and failed):
        return rows
    with b.m.compile.no_compile():
        again = {(r["name"], r["case"]): r for r in _run_section(b, section, B, False)}
    for i, r in enumerate(rows):
        key = (r["name"], r["case"])
        if key in failed and key in again:
            rows[i] = dict(again[key], compile_error=failed[key])
    return rows


def _probe_compile(m, device) -> str | None:
    """None if torch.compile works here (moshi compiles its RMSNorm, RoPE and gated FFN on
    CUDA, as its server runs), else why not."""
    from moshi.modules.transformer import _rms_norm
    try:
        x = torch.randn(2, 1, 64, device=device, dtype=torch.bfloat16)
        _rms_norm(x, torch.ones(1, 1, 64, device=device), torch.float32, 1e-8)
        torch.cuda.synchronize(device)
        return None
    except Exception as e:
        return _describe(e)


def measure(batches=(1, 8, 32), context=3000, device="cuda", iters=20, *, tiny=False, graphs=True,
            compile=True, dtype=torch.bfloat16, mimi_dtype=torch.float32, sections=SECTIONS,
            on_row=None) -> dict:
    """Time every section at every B; returns {"info", "meta", "rows", "records"} (see --help)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"torch_bench: torch {torch.__version__} sees no CUDA device; "
                         "run on the GPU machine, or pass --device cpu --tiny --no-graphs")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"torch_bench: unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    m, stubbed = import_moshi()
    graphs = graphs and device.type == "cuda"
    compile_error = None
    if device.type != "cuda":
        compile = False  # moshi itself never compiles off CUDA inside its layers
    elif compile:
        from torch import _dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # one entry per B and width
            if hasattr(_dynamo.config, name):
                setattr(_dynamo.config, name, 64)
                break
        compile_error = _probe_compile(m, device)
        compile = compile_error is None
    torch.manual_seed(0)
    b = Bench(m, device, dtype, mimi_dtype, context, iters, tiny, graphs, compile)
    meta = dict(
        framework="torch", torch=torch.__version__, cuda=torch.version.cuda, moshi=m.version,
        python=platform.python_version(), stubbed=stubbed, date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype).removeprefix("torch."), mimi_dtype=str(mimi_dtype).removeprefix("torch."),
        context=context, kv_slots=b.lm_kwargs["context"], iters=iters, warmup=WARMUP, graphs=graphs,
        compile=compile, compile_error=compile_error, tiny=tiny, lm_config=b.lm_kwargs,
        mimi_config=b.mimi_config)
    records = []
    no_compile = contextlib.nullcontext() if compile else m.compile.no_compile()
    threads = torch.get_num_threads()
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)  # at tiny widths, threads only wait on each other (and on CI's)
    try:
        with torch.no_grad(), no_compile:
            for section in sections:
                for B in batches:
                    for record in _section(b, section, B):
                        records.append(record)
                        if on_row is not None:
                            on_row(record, _result(meta, records))
    finally:
        torch.set_num_threads(threads)
    return _result(meta, records)


def format_row(row: dict) -> str:
    what = f"{row['name']}" + (f" [{row['case']}]" if row.get("case") else "")
    if row.get("error"):
        return f"{what:44s} B={row['B']:<3d} ERROR {row['error']}"
    extra = f"  peak {row['peak_gb']:.1f} GB" if row["peak_gb"] is not None else ""
    if row["bytes"]:
        extra += f"  {row['bytes'] / row['ms'] / 1e6:.0f} GB/s"
    return f"{what:44s} B={row['B']:<3d} {row['ms']:9.3f} ms (min {row['min_ms']:.3f}){extra}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the result here (rewritten after every row)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=3000, help="frames already in the KV cache")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke test)")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs, moshi's included")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile of moshi's kernels")
    p.add_argument("--mimi-dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)

    def on_row(row, result):
        print(format_row(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    result = measure([int(x) for x in args.batches.split(",")], args.context, args.device, args.iters,
                     tiny=args.tiny, graphs=not args.no_graphs, compile=not args.no_compile,
                     mimi_dtype=getattr(torch, args.mimi_dtype), sections=args.sections.split(","),
                     on_row=on_row)
    meta = result["meta"]
    failed = f" (torch.compile failed: {meta['compile_error']})" if meta["compile_error"] else ""
    print(result["info"] + failed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 1 if any(r["error"] for r in result["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
