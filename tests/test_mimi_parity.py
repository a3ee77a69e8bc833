"""Parity with the official PyTorch `moshi` package, fp32, streaming.

moshi builds its MimiModel with the official config (32 stored codebooks, 8 used) and,
to exercise the wrap of the attention window, with a small config; weights are random;
its codebooks, which moshi leaves at zero until k-means at training time, get centroids
drawn from the clip's own residuals (see `_randomize_codebooks`). Its state_dict is saved as
safetensors and loaded into ours. A few seconds of espeak-ng speech then go through both,
one 1920-sample frame at a time, in streaming mode on both sides.
"""

import os
import shutil
import subprocess
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
loaders = pytest.importorskip("moshi.models.loaders")
from safetensors.torch import save_file  # noqa: E402

from personaplex_fast.audio import read_audio  # noqa: E402
from personaplex_fast.config import MimiConfig  # noqa: E402
from personaplex_fast.mimi_checkpoint import load_mimi, tiny_mimi_config  # noqa: E402

FRAME = 1920
N_FRAMES = 40  # 3.2 s
TEXT = "The quick brown fox jumps over the lazy dog, while the codec listens frame by frame."


def _speech(tmp_path) -> np.ndarray:
    """espeak-ng speech at 24 kHz; a harmonic stand-in only where espeak-ng is missing."""
    n = N_FRAMES * FRAME
    if shutil.which("espeak-ng"):
        wav = tmp_path / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), TEXT], check=True, capture_output=True)
        pcm = read_audio(wav)  # 22.05 kHz -> 24 kHz through soxr
        return np.pad(pcm, (0, max(0, n - len(pcm))))[:n]
    print("espeak-ng not found: using a synthetic harmonic signal")
    t = np.arange(n) / 24000
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.5 * t)) / 24000
    return (0.2 * sum(np.sin(k * phase) / k for k in range(1, 10))).astype(np.float32)


def _randomize_codebooks(model, pcm: np.ndarray) -> None:
    """Random centroids with clear nearest neighbours, so codes test the arithmetic rather
    than the luck of near-ties. First level: one noisy copy of each frame of this clip
    (codes vary frame to frame) among far-away decoys; deeper levels: small Gaussians that
    shave a little off the residual each, keeping it well above float error."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latent = model._encode_to_unquantized_latent(torch.from_numpy(pcm)[None, None])
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)[0].T  # [T, 256]
            for level, layer in enumerate(rvq.vq.layers):
                book = layer._codebook
                shape = book.embedding_sum.shape
                noise = torch.randn(shape, generator=gen)
                spread = residual.std(dim=0)
                if level == 0:
                    centroids = residual.mean(dim=0) + 4 * spread * noise
                    frames = residual.shape[0]
                    centroids[:frames] = residual + 0.5 * spread * noise[:frames]
                else:
                    centroids = 0.3 * spread * noise
                usage = 0.5 + 1.5 * torch.rand(shape[0], generator=gen)
                book.embedding_sum.copy_(centroids * usage[:, None])
                book.cluster_usage.copy_(usage)
                book._initialized.fill_(1.0)
                book._embedding = None  # moshi caches embedding_sum / usage on first use
                residual = residual - book.embedding[torch.cdist(residual, book.embedding).argmin(-1)]


def _moshi_config(cfg: MimiConfig) -> dict:
    """moshi's `get_mimi` config dict for one of ours (cf. moshi.models.loaders._mimi_config)."""
    s, t, q = cfg.seanet, cfg.transformer, cfg.quantizer
    seanet = dict(channels=s.channels, dimension=s.dimension, causal=True, n_filters=s.n_filters,
                  n_residual_layers=s.n_residual_layers, activation="ELU", compress=s.compress,
                  dilation_base=s.dilation_base, disable_norm_outer_blocks=0,
                  kernel_size=s.kernel_size, residual_kernel_size=s.residual_kernel_size,
                  last_kernel_size=s.last_kernel_size, norm="none", pad_mode="constant",
                  ratios=list(s.ratios), true_skip=True)
    transformer = dict(d_model=t.d_model, num_heads=t.num_heads, num_layers=t.num_layers,
                       causal=True, layer_scale=t.layer_scale, context=t.context, conv_layout=True,
                       max_period=t.max_period, gating="none", norm="layer_norm",
                       positional_embedding="rope", dim_feedforward=t.dim_feedforward,
                       input_dimension=s.dimension, output_dimensions=[s.dimension])
    quantizer = dict(dimension=q.dimension, n_q=q.n_q, bins=q.bins, input_dimension=s.dimension,
                     output_dimension=s.dimension)
    return dict(sample_rate=cfg.sample_rate, channels=s.channels, frame_rate=cfg.frame_rate,
                seanet=seanet, transformer=transformer, quantizer=quantizer)


# The official size, and a small one whose 16-step attention window wraps 5 times in the clip.
CONFIGS = {"official": None, "small_window": replace(
    tiny_mimi_config(), transformer=replace(tiny_mimi_config().transformer, context=16))}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp = tmp_path_factory.mktemp("parity")
    pcm = _speech(tmp)
    cfg = CONFIGS[request.param]
    # Official: moshi's own default config, and no config stored for ours to find.
    theirs = loaders.get_mimi(None, None if cfg is None else _moshi_config(cfg), num_codebooks=8)
    _randomize_codebooks(theirs, pcm)
    path = tmp / "mimi.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    ours = load_mimi(path, config=cfg)
    assert ours.cfg == (cfg or MimiConfig())
    return pcm, theirs, ours


def _moshi_encode(model, pcm):
    with torch.no_grad(), model.streaming(1):
        frames = [model.encode(torch.from_numpy(pcm[i * FRAME:(i + 1) * FRAME])[None, None])
                  for i in range(len(pcm) // FRAME)]
    return torch.cat(frames, dim=-1).numpy()  # [1, 8, T]


def _moshi_decode(model, codes):
    with torch.no_grad(), model.streaming(1):
        frames = [model.decode(torch.from_numpy(codes[..., i:i + 1])) for i in range(codes.shape[-1])]
    return torch.cat(frames, dim=-1)[:, 0].numpy()


def _ours_encode(model, pcm):
    state, out = model.new_encoder_state(1), []
    for i in range(len(pcm) // FRAME):
        codes = model.encode_step(mx.array(pcm[None, i * FRAME:(i + 1) * FRAME]), state)
        mx.eval(codes, *state.arrays())
        out.append(np.array(codes))
    return np.stack(out, axis=-1)


def _ours_decode(model, codes):
    state, out = model.new_decoder_state(1), []
    for i in range(codes.shape[-1]):
        pcm = model.decode_step(mx.array(codes[..., i]), state)
        mx.eval(pcm, *state.arrays())
        out.append(np.array(pcm))
    return np.concatenate(out, axis=-1)


def _rel(ours, theirs):
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def test_streaming_parity_with_moshi(pair):
    pcm, theirs, ours = pair

    t0 = time.perf_counter()
    codes_theirs = _moshi_encode(theirs, pcm)
    t1 = time.perf_counter()
    codes_ours = _ours_encode(ours, pcm)
    t2 = time.perf_counter()
    assert codes_ours.shape == codes_theirs.shape == (1, 8, N_FRAMES)
    assert len(np.unique(codes_theirs[:, 0])) > N_FRAMES // 4, "semantic codes collapsed"
    mismatched = codes_ours != codes_theirs
    print(f"\nencode {N_FRAMES} frames: moshi {t1 - t0:.2f}s, ours {t2 - t1:.2f}s; "
          f"mismatched codes {mismatched.sum()}/{mismatched.size}, "
          f"per codebook {mismatched.sum(axis=(0, 2)).tolist()}")
    assert mismatched.mean() <= 1e-3

    # Same codes on both sides isolates the decoder from any code flip.
    t0 = time.perf_counter()
    audio_theirs = _moshi_decode(theirs, codes_theirs)
    t1 = time.perf_counter()
    audio_ours = _ours_decode(ours, codes_theirs)
    t2 = time.perf_counter()
    err_same = _rel(audio_ours, audio_theirs)
    print(f"decode: moshi {t1 - t0:.2f}s, ours {t2 - t1:.2f}s; rel err on moshi's codes {err_same:.2e}")
    assert audio_ours.shape == audio_theirs.shape == (1, N_FRAMES * FRAME)
    assert err_same <= 1e-4

    # End to end, each side decoding its own codes.
    err_own = err_same if not mismatched.any() else _rel(_ours_decode(ours, codes_ours), audio_theirs)
    print(f"end to end rel err (each its own codes) {err_own:.2e}")
    assert err_own <= 1e-4
