"""Parity of our LM with Kyutai's official `moshi` package on the same weights.

Both load one tiny random checkpoint written in the official format; both are
fed the same user tokens for 300 frames with a context of 50, so the KV ring
wraps several times. Tolerances: text logits relative error <= 1e-4 in fp32 at
every frame (measured ~1e-6: only summation order differs), greedy text and
depformer tokens identical at every frame.
"""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import mlx.core as mx
import numpy as np
import pytest
import safetensors.torch
import torch
from moshi.models.lm import LMGen, LMModel

from personaplex_fast.checkpoint import load_lm
from personaplex_fast.config import DepformerConfig, LMConfig
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import write_lm

FRAMES = 300
PARITY = LMConfig(
    dim=128, num_heads=4, num_layers=2, context=50, text_card=300, card=64,
    depformer=DepformerConfig(dim=64, num_heads=4, num_layers=2, dim_feedforward=192),
)


def moshi_lm(cfg: LMConfig, file) -> LMModel:
    d = cfg.depformer
    model = LMModel(
        delays=list(cfg.delays), n_q=cfg.n_q, dep_q=cfg.dep_q, card=cfg.card,
        text_card=cfg.text_card, dim=cfg.dim, num_heads=cfg.num_heads,
        hidden_scale=cfg.hidden_scale, norm=cfg.norm, depformer_dim=d.dim,
        depformer_dim_feedforward=d.dim_feedforward, depformer_multi_linear=True,
        depformer_weights_per_step=True, depformer_pos_emb="none",
        existing_text_padding_id=cfg.existing_text_padding_id, context=cfg.context,
        causal=True, num_layers=cfg.num_layers, layer_scale=None, max_period=cfg.max_period,
        gating="silu", positional_embedding="rope", depformer_num_heads=d.num_heads,
        depformer_num_layers=d.num_layers, depformer_layer_scale=None,
        depformer_max_period=d.max_period, depformer_gating="silu", depformer_context=cfg.dep_q,
        device="cpu", dtype=torch.float32)
    model.load_state_dict(safetensors.torch.load_file(str(file)), strict=True)
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_lm_matches_moshi_over_wrapping_context(tmp_path, seed):
    write_lm(tmp_path, PARITY, seed=seed)
    theirs = moshi_lm(PARITY, tmp_path / "model.safetensors")
    ours = load_lm(tmp_path)

    B = 2
    rng = np.random.default_rng(100 + seed)
    user = rng.integers(0, PARITY.card, size=(FRAMES, B, PARITY.user_q))

    their_logits = []
    gen = LMGen(theirs, use_sampling=False, on_text_logits_hook=lambda l: their_logits.append(l.clone()))
    state = ours.new_state(B)
    greedy = SamplingConfig(greedy=True)
    worst = 0.0
    compared = 0
    with torch.no_grad(), gen.streaming(B):
        for t in range(FRAMES):
            theirs_out = gen.step(torch.from_numpy(user[t][:, :, None]).long())
            out = ours.step(state, mx.array(user[t]), greedy)
            mx.eval(out.text, out.audio, out.text_logits)

            ref = their_logits[-1][:, 0, 0].numpy()
            got = np.array(out.text_logits)
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            worst = max(worst, rel)
            assert rel <= 1e-4, f"frame {t}: text logits relative error {rel:.2e}"

            valid = np.array(out.valid)
            assert (theirs_out is None) == (not valid.any()), f"frame {t}: warm-up differs"
            if theirs_out is not None:
                expect = theirs_out[:, :, 0].numpy()
                assert np.array_equal(np.array(out.text), expect[:, 0]), f"frame {t}: text tokens"
                assert np.array_equal(np.array(out.audio), expect[:, 1:]), f"frame {t}: audio tokens"
                compared += 1
    assert compared == FRAMES - PARITY.max_delay
    print(f"worst text-logit relative error over {FRAMES} frames: {worst:.2e}")
