"""Checkpoint loading, key checking, make-tiny and convert, through the CLI as a user runs them."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from personaplex_fast.checkpoint import load_lm
from personaplex_fast.config import LMConfig
from personaplex_fast.errors import CheckpointError


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "personaplex_fast.cli", *args],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cli("make-tiny", str(d))
    return d


def logits_for(model, frames=6, seed=0):
    """Text logits of the temporal transformer, teacher-forced on random tokens
    (so a different token sampled by one model cannot make the runs diverge)."""
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    state = model.new_state(1)
    out = []
    for _ in range(frames):
        tokens = np.concatenate([rng.integers(0, cfg.text_card, (1, 1)),
                                 rng.integers(0, cfg.card, (1, cfg.n_q))], axis=1)
        _, logits = model.temporal(model.embed_frame(mx.array(tokens)), state)
        state.offsets = state.offsets + 1
        out.append(np.array(logits.astype(mx.float32)))
    return np.stack(out)


def test_make_tiny_writes_official_layout(tiny):
    from safetensors import safe_open

    with safe_open(str(tiny / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "transformer.layers.0.self_attn.in_proj_weight" in keys
    assert "depformer.layers.0.self_attn.in_proj_weight" in keys
    assert "out_norm.alpha" in keys and "text_emb.weight" in keys
    cfg = json.loads((tiny / "config.json").read_text())
    assert LMConfig.from_dict(cfg).dim == cfg["dim"]


def test_make_random_is_an_official_checkpoint_of_its_draw(tmp_path):
    """tiny.make_random (serve_sessions.py --random 7b, where the weights cannot be
    downloaded), at small widths with the official cards: it loads as an official
    checkpoint (bf16 LM, the official Mimi, a tokenizer) holding exactly the weights drawn
    on the device, at the scales of the tests' numpy draw."""
    from mlx.utils import tree_flatten

    from personaplex_fast.config import DepformerConfig, MimiConfig
    from personaplex_fast.loading import load_model
    from personaplex_fast.tiny import make_random, random_lm_weights

    cfg = LMConfig(dim=64, num_heads=2, num_layers=2, context=40, text_card=400,
                   depformer=DepformerConfig(dim=32, num_heads=2, num_layers=2, dim_feedforward=64))
    model = load_model(make_random(tmp_path, cfg, seed=1))
    assert model.lm.cfg == cfg and model.mimi.cfg == MimiConfig() and model.tokenizer is not None
    drawn = random_lm_weights(cfg, seed=1, dtype=mx.bfloat16, device=True)
    loaded = dict(tree_flatten(model.lm.parameters()))
    assert set(loaded) == set(drawn)
    for key, w in drawn.items():
        assert loaded[key].dtype == mx.bfloat16 and mx.array_equal(loaded[key], w), key
    numpy_draw = random_lm_weights(cfg, seed=1)
    alphas = []
    for key, w in drawn.items():
        a, b = np.array(w.astype(mx.float32)), np.array(numpy_draw[key])
        if key.endswith("alpha"):
            alphas.append(a.ravel())
        elif a.size >= 2000:
            assert abs(a.std() / b.std() - 1) < 0.1, key
    alphas = np.concatenate(alphas)
    assert abs(alphas.mean() - 1) < 0.03 and abs(alphas.std() / 0.1 - 1) < 0.2


def test_default_config_is_the_official_7b():
    cfg = LMConfig()
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.context) == (4096, 32, 32, 3000)
    assert cfg.ffn_hidden == 11264 and cfg.depformer.ffn_hidden == 2816
    assert cfg.delays == (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    assert (cfg.text_card, cfg.card, cfg.n_q, cfg.dep_q) == (32000, 2048, 16, 8)
    # PersonaPlex's generator config says dep_q = n_q = 16 (its depformer also predicts
    # the user's codebooks); the model's own streams are still the first 8.
    assert LMConfig.from_dict({"model_type": "personaplex", "n_q": 16, "dep_q": 16}).dep_q == 8


def test_convert_says_which_layers_stay_unquantized(tiny, tmp_path):
    """At group size 128 the tiny depformer's 64-wide inputs cannot be quantized: said, by
    name pattern, count and width (at 64 only the 352-wide gated outputs are left)."""
    out = cli("convert", str(tiny), str(tmp_path / "q128"), "--q-bits", "4", "--group-size", "128").stdout
    line = next(l for l in out.splitlines() if l.startswith("convert: linear layers quantized"))
    assert "kept at full precision, their input width not a multiple of 128" in line
    for kept in ("depformer.layers.*.self_attn.in_projs.* (16 of width 64)", "linears.* (8 of width 64)",
                 "transformer.layers.*.gating.linear_out (2 of width 352)"):
        assert kept in line, line
    assert "transformer.layers.*.self_attn" not in line
    q = load_lm(tmp_path / "q128")
    assert isinstance(q.linears[0], nn.Linear) and not isinstance(q.linears[0], nn.QuantizedLinear)


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_quantized_loads_and_stays_close(tiny, tmp_path, bits):
    dst = tmp_path / f"q{bits}"
    cli("convert", str(tiny), str(dst), "--q-bits", str(bits))
    q = load_lm(dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["personaplex_fast"]["quantization"] == {"bits": bits, "group_size": 64}
    w = q.transformer.layers[0].gating.linear_in
    assert w.bits == bits and w.group_size == 64
    ref, got = logits_for(load_lm(tiny)), logits_for(q)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < (0.25 if bits == 4 else 0.03), rel
    assert (dst / "tokenizer-e351c8d8-checkpoint125.safetensors").exists() == (
        tiny / "tokenizer-e351c8d8-checkpoint125.safetensors").exists()


def test_convert_unquantized_is_exact(tiny, tmp_path):
    cli("convert", str(tiny), str(tmp_path / "plain"))
    np.testing.assert_array_equal(logits_for(load_lm(tmp_path / "plain")), logits_for(load_lm(tiny)))


def test_convert_refuses_to_overwrite(tiny, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = cli("convert", str(tiny), str(tmp_path), check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def _rewrite(tiny, dst, edit):
    dst.mkdir()
    weights = mx.load(str(tiny / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    (dst / "config.json").write_text((tiny / "config.json").read_text())
    return dst


def test_missing_key_is_named_without_traceback(tiny, tmp_path):
    bad = _rewrite(tiny, tmp_path / "bad", lambda w: w.pop("transformer.layers.1.norm2.alpha"))
    proc = cli("convert", str(bad), str(tmp_path / "out"), "--q-bits", "4", check=False)
    assert proc.returncode == 2
    assert "missing key transformer.layers.1.norm2.alpha" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unexpected_and_misshaped_keys_are_named(tiny, tmp_path):
    def extra(w):
        w["transformer.layers.0.bogus.weight"] = mx.zeros((2,))

    def misshape(w):
        w["text_linear.weight"] = w["text_linear.weight"][:-1]

    with pytest.raises(CheckpointError, match="unexpected key transformer.layers.0.bogus.weight"):
        load_lm(_rewrite(tiny, tmp_path / "extra", extra))
    with pytest.raises(CheckpointError, match=r"text_linear.weight has shape \(999, 128\)"):
        load_lm(_rewrite(tiny, tmp_path / "shape", misshape))


def test_sources_that_cannot_be_found_give_one_line(tmp_path):
    proc = cli("convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = cli("convert", str(tmp_path / "empty"), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "no model.safetensors" in proc.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = cli("convert", str(tmp_path / "junk"), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "cannot read safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hf_name_offline_fails_with_one_clear_line(tmp_path):
    """No machine here reaches the Hub: the download path must say so in one line."""
    env_cache = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "personaplex_fast.cli", "lm-run", "--model", "nvidia/personaplex-7b-v1"],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HOME": str(env_cache)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvidia/personaplex-7b-v1" in lines[0], proc.stderr
    assert "not reachable" in lines[0] or "HF_HUB_OFFLINE" in lines[0]


def test_depformer_steps_beyond_dep_q_are_ignored(tiny, tmp_path):
    """PersonaPlex's generator carries 16 depformer steps; we run the first dep_q."""
    def more_steps(w):
        for k in list(w):
            if k.startswith("linears."):
                w[f"linears.{8 + int(k.split('.')[1])}.weight"] = w[k]
            if k.endswith("self_attn.in_proj_weight") and k.startswith("depformer."):
                w[k] = mx.concatenate([w[k], w[k]], axis=0)
    model = load_lm(_rewrite(tiny, tmp_path / "sixteen", more_steps))
    np.testing.assert_array_equal(logits_for(model), logits_for(load_lm(tiny)))
