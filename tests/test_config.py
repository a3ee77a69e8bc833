"""config.json: the official key sets load unchanged; every other value is checked by name."""

import inspect
import json
import re

import pytest
from moshi.models import loaders

from personaplex_fast import checkpoint
from personaplex_fast.checkpoint import CheckpointError, load_lm, read_config
from personaplex_fast.config import LMConfig
from personaplex_fast.tiny import TINY, write_lm

# What moshi's CheckpointInfo.from_hf_repo takes out of config.json before the rest
# becomes LMModel's keyword arguments, with the values the official repos carry.
CHECKPOINT_KEYS = {
    "moshi_name": "model.safetensors", "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "mimi_config_name": None, "tokenizer_name": "tokenizer_spm_32k_3.model", "lora_name": None,
    "model_type": "moshi", "lm_gen_config": {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25},
    "tts_config": {}, "stt_config": {}, "model_id": {"sig": "e351c8d8", "epoch": 125},
}


def test_checkpoint_keys_are_the_ones_moshi_reads():
    popped = set(re.findall(r'lm_config\.pop\("(\w+)"', inspect.getsource(loaders)))
    assert popped == set(CHECKPOINT_KEYS)


def official(repo: str) -> dict:
    """The full config.json of kyutai/moshiko-pytorch-bf16 (moshi's _lm_kwargs), or
    PersonaPlex's settings written out the same way (its loader's: dep_q = 16 and the
    deprecated depformer_causal; its model type)."""
    cfg = {**loaders._lm_kwargs, **CHECKPOINT_KEYS}
    if repo == "personaplex":
        cfg.update(dep_q=16, depformer_causal=True, model_type="personaplex")
    return json.loads(json.dumps(cfg))


@pytest.mark.parametrize("repo", ["moshiko", "personaplex"])
@pytest.mark.parametrize("nested", [False, True])
def test_official_configs_load_unchanged(tmp_path, repo, nested):
    cfg = official(repo)
    if nested:  # the lm_config layout moshi also reads
        cfg = {k: cfg.pop(k) for k in list(CHECKPOINT_KEYS)} | {"lm_config": cfg}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_config(tmp_path)[0] == LMConfig()


def config_error(tmp_path, **changes) -> str:
    cfg = official("moshiko") | changes
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    return message


@pytest.mark.parametrize("change, error", [
    (dict(context=10**9), "context = 1e+09 is out of range (1 to 131072)"),
    (dict(num_layers=10**6), "num_layers = 1e+06 is out of range"),
    (dict(dim=10**9), "dim = 1e+09 is out of range"),
    (dict(card=-5), "card = -5 is out of range"),
    (dict(num_heads=0), "num_heads = 0 is out of range"),
    (dict(dim="128"), 'dim must be an integer, got "128"'),
    (dict(depformer_multi_linear=1), "depformer_multi_linear must be true or false, got 1"),
    (dict(hidden_scale=None), "hidden_scale must be a number, got null"),
    (dict(delays=[0, 1]), "2 delays given, need n_q + 1 = 17"),
    (dict(delays=[0] * 16 + [-1]), "delays must be a list of integers from 0 to 16"),
    (dict(dim=4001), "dim 4001 is not divisible by num_heads 32"),
    (dict(dim=4064), "dim / num_heads = 127 must be even"),
    (dict(dep_q=17), "dep_q 17 must be from 1 to n_q - 1 = 15"),
    (dict(depformer_gating="gelu"), "depformer_gating = \"gelu\" is not implemented (only \"silu\")"),
    (dict(depformer_pos_emb="sin"), "depformer_pos_emb = 'sin' is not implemented (only 'none' or 'rope')"),
    (dict(layer_scale=0.01), "layer_scale = 0.01 is not implemented (only null)"),
    (dict(causal=False), "causal = false is not implemented (only true)"),
    (dict(conditioners={"description": {"type": "lut"}}),
     'conditioners = {"description": {"type": "lut"}} is not implemented (only null or {})'),
    (dict(extra_heads_num_heads=2), "extra_heads_num_heads = 2 is not implemented (only 0)"),
    (dict(existing_text_padding_id=7), "existing_text_padding_id = 7 is not implemented (only 3)"),
    (dict(text_card_out=100), "text_card_out = 100 is not implemented (only null or text_card)"),
    (dict(lora=True), "lora = true is not implemented (only false)"),
    (dict(num_layer=31), "unknown key 'num_layer'"),
])
def test_bad_values_are_refused_by_name(tmp_path, change, error):
    assert error in config_error(tmp_path, **change)


def test_null_feedforward_is_read_as_moshi_reads_it(tmp_path):
    cfg = official("moshiko") | dict(depformer_dim_feedforward=None, hidden_scale=4.125)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_config(tmp_path)[0].depformer.dim_feedforward == int(4.125 * 1024)


def test_settings_without_math_take_any_value(tmp_path):
    cfg = official("moshiko") | dict(depformer_context=3, model_type="hibiki", lora_rank=8,
                                         lm_gen_config={"temp": 0.1}, text_card_out=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_config(tmp_path)[0] == LMConfig()


def test_personaplex_is_known_by_its_model_type(tmp_path):
    """nvidia/personaplex-7b-v1's own config.json names the model type and a version (the
    rest is the 7B default); its generator's dep_q = n_q means half of the streams for
    PersonaPlex only: another model with dep_q = n_q is refused, not misread."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "personaplex", "version": "1.0"}))
    assert read_config(tmp_path)[0] == LMConfig()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "personaplex", "dep_q": 16}))
    assert read_config(tmp_path)[0].dep_q == 8
    for other in ("moshi", "hibiki", None):
        error = config_error(tmp_path, dep_q=16, model_type=other)
        assert "dep_q 16 must be from 1 to n_q - 1 = 15" in error and 'model_type "personaplex"' in error


def test_configs_beyond_the_weights_or_the_memory_are_refused_before_building(tmp_path, monkeypatch):
    write_lm(tmp_path, TINY)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | dict(num_layers=1000)))
    monkeypatch.setattr(checkpoint, "LM", lambda cfg: pytest.fail("built the model"))
    with pytest.raises(CheckpointError, match="more than model.safetensors .* can hold"):
        load_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | dict(context=130_000)))
    monkeypatch.setattr(checkpoint, "device_memory", lambda: 100 << 20)
    with pytest.raises(CheckpointError, match=r"needs at least 0\.1 GiB .* 130000-frame KV cache of 1 "
                                              r"session\(s\)\); this device has 0\.1 GiB"):
        load_lm(tmp_path)
