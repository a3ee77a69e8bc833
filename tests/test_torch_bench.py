"""bench/torch_bench.py at tiny sizes on the CPU (no CUDA graphs): every row times, and the
temporal step it times computes what moshi's plain forward does.

The bench makes the KV cache "full" by setting the ring's offsets instead of stepping
`context` frames (fill_context); here the same call, given the K/V of a real prefill, must
reproduce a no-cache forward over all the tokens, for a context inside, at and past the
ring's capacity. Tolerance: fp32, 1e-5 relative (only summation order differs).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moshi")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import torch_bench  # noqa: E402

NAMES = {"matvec", "attention", "temporal", "forward_text", "depformer", "lm_step", "mimi_encode",
         "mimi_decode", "frame"}


@pytest.fixture(scope="module")
def moshi():
    m, _ = torch_bench.import_moshi()
    return m


def test_every_row_times():
    result = torch_bench.measure([1, 2], 20, "cpu", 3, tiny=True, graphs=False, dtype=torch.float32)
    records = result["records"]
    assert {r["name"] for r in records} == NAMES
    for r in records:
        assert r["error"] is None, r
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
    assert result["meta"]["graphs"] is False and result["meta"]["tiny"] is True
    # The table view bench/gpu_bench.py merges: one time per key and B.
    assert {"attention", "temporal fp32", "lm_step fp32", "mimi_encode", "frame fp32"} <= set(result["rows"])
    assert all(isinstance(t, float) for per_b in result["rows"].values() for t in per_b.values())
    assert sum(len(per_b) for per_b in result["rows"].values()) == len(records)


@pytest.mark.parametrize("context", [7, 16, 19])  # inside, at and past the 16-slot ring
def test_temporal_step_matches_plain_forward(moshi, context):
    lm_kwargs, _ = torch_bench.configs(moshi, tiny=True)
    capacity = lm_kwargs["context"]
    torch.manual_seed(0)
    lm = moshi.loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    transformer = lm.transformer
    B = 2
    x = torch.randn(B, context + 1, lm.dim)
    with torch.no_grad(), moshi.compile.no_compile():
        plain = transformer(x)[:, -1:]
        with transformer.streaming(B):
            # The real prefill: one chunk up to the ring's capacity, then frame by frame (a
            # chunk that wraps the ring overwrites keys its own first queries still need).
            transformer(x[:, :min(context, capacity)])
            for t in range(capacity, context):
                transformer(x[:, t:t + 1])
            kv = [layer.self_attn._streaming_state.kv_cache.cache.clone() for layer in transformer.layers]
        with transformer.streaming(B):
            torch_bench.fill_context(transformer, context, kv)
            stepped = torch_bench.temporal_step(transformer, x[:, context:])()
    torch.testing.assert_close(stepped, plain, rtol=1e-5, atol=1e-5)


def test_7b_config_is_personaplex(moshi):
    """The kwargs the bench builds the 7B from are the ones our MLX model uses."""
    from personaplex_fast.config import LMConfig

    kw, mimi = torch_bench.configs(moshi, tiny=False)
    ours = LMConfig()
    d = ours.depformer
    assert (kw["dim"], kw["num_heads"], kw["num_layers"], kw["hidden_scale"], kw["context"]) == (
        ours.dim, ours.num_heads, ours.num_layers, ours.hidden_scale, ours.context)
    assert (kw["n_q"], kw["dep_q"], kw["card"], kw["text_card"], tuple(kw["delays"])) == (
        ours.n_q, ours.dep_q, ours.card, ours.text_card, ours.delays)
    assert (kw["depformer_dim"], kw["depformer_num_heads"], kw["depformer_num_layers"],
            kw["depformer_dim_feedforward"], kw["depformer_weights_per_step"],
            kw["depformer_multi_linear"], kw["depformer_pos_emb"]) == (
        d.dim, d.num_heads, d.num_layers, d.dim_feedforward, d.weights_per_step, d.multi_linear,
        d.pos_emb)
    assert mimi["quantizer"]["bins"] == ours.card and mimi["sample_rate"] / mimi["frame_rate"] == 1920


def test_runs_without_moshis_download_and_tokenizer_deps(tmp_path):
    """The GPU image may lack huggingface_hub, safetensors or sentencepiece: they are stubbed."""
    code = (
        "import sys, json\n"
        "for n in ('huggingface_hub', 'safetensors', 'sentencepiece'): sys.modules[n] = None\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import torch_bench\n"
        f"sys.exit(torch_bench.main(['--device', 'cpu', '--tiny', '--no-graphs', '--batches', '1',"
        f" '--iters', '1', '--sections', 'temporal', '--json', {str(tmp_path / 'out.json')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    import json

    result = json.loads((tmp_path / "out.json").read_text())
    assert "sentencepiece" in result["meta"]["stubbed"]
    assert all(r["error"] is None for r in result["records"])
