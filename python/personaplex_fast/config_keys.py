"""What a config.json may say: every key `moshi`'s loaders read, checked before a model is built.

moshi's `CheckpointInfo.from_hf_repo` takes the file names, the model type and the
generation defaults out of config.json and passes the rest to `LMModel(**kwargs)`,
which hands the keys it does not name to its two StreamingTransformers (the
`depformer_` ones, prefix removed, to the depformer's). Every key is therefore one of:

    modelled      read by LMConfig; type- and range-checked here
    fixed         changes the math; accepted at the value this implementation computes
                  (the official models' value), refused by name otherwise
    no math       file names, generation defaults, repo metadata, training switches
    unknown       refused by name: moshi itself would fail on it

The ranges are far above any released model's; what they still allow is bounded by
the memory check in checkpoint.load_lm.
"""

from __future__ import annotations

_INT, _NUM, _STR, _BOOL = "an integer", "a number", "a string", "true or false"


def _is(value, kind: str) -> bool:
    if kind == _INT:
        return type(value) is int
    if kind == _NUM:
        return type(value) in (int, float)
    if kind == _STR:
        return type(value) is str
    return type(value) is bool


# key -> (kind, lowest, highest); strings -> (kind, allowed values).
MODELLED = {
    "dim": (_INT, 1, 32768),
    "num_heads": (_INT, 1, 1024),
    "num_layers": (_INT, 1, 1024),
    "hidden_scale": (_NUM, 0.01, 64),
    "context": (_INT, 1, 1 << 17),
    "max_period": (_NUM, 1, 1e9),
    "text_card": (_INT, 4, 1 << 20),
    "existing_text_end_padding_id": (_INT, 0, 1 << 20),
    "card": (_INT, 2, 1 << 16),
    "n_q": (_INT, 2, 64),
    "dep_q": (_INT, 1, 64),
    "depformer_dim": (_INT, 1, 32768),
    "depformer_num_heads": (_INT, 1, 1024),
    "depformer_num_layers": (_INT, 1, 256),
    "depformer_dim_feedforward": (_INT, 1, 1 << 20),  # or null: hidden_scale x depformer_dim
    "depformer_max_period": (_NUM, 1, 1e9),
    "depformer_weights_per_step": (_BOOL, None, None),
    "depformer_multi_linear": (_BOOL, None, None),
    "norm": (_STR, ("rms_norm_f32", "rms_norm")),
    "positional_embedding": (_STR, ("rope",)),
    "gating": (_STR, ("silu",)),
    "depformer_pos_emb": (_STR, ("none", "rope")),
}
MAX_DELAY = 16

# Settings that change the math, at the values implemented (null: absent in moshi).
FIXED = {
    "causal": (True,),
    "layer_scale": (None,),
    "depformer_layer_scale": (None,),
    "depformer_gating": ("silu",),
    "existing_text_padding_id": (3,),  # tokenizer.TEXT_PAD
    "demux_second_text_stream": (False,),
    "demux_second_stream": (False,),
    "norm_emb": (False,),
    "bias_proj": (False,),
    "depformer_weights_per_step_schedule": (None,),
    "depformer_low_rank_embeddings": (None,),
    "depformer_norm": (None,),
    "extra_heads_num_heads": (0,),
    "conditioners": (None, {}),
    "fuser": (None,),
    "cross_attention": (False,),
    "depformer_cross_attention": (False,),
    "kv_repeat": (1,),
    "depformer_kv_repeat": (1,),
    "skip_self_attn": (False,),
    "depformer_skip_self_attn": (False,),
    "weights_per_step": (0,),
    "weights_per_step_schedule": (None,),
    "quantize": (False,),
    "lora": (False,),
}

# Keys without math here: file names and model type (CheckpointInfo; file names are read
# by config.ModelFiles, "personaplex" by LMConfig.from_dict), PersonaPlex's version, generation and
# TTS/STT defaults, provenance, LoRA sizes (LoRA itself is `lora`), training-only
# switches, the sinusoidal embedding's scale (no sinusoidal embedding is accepted),
# moshi's ignored depformer context and deprecated depformer_causal, and our own mark.
NO_MATH = {
    "moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
    "lm_gen_config", "tts_config", "stt_config", "model_id", "lora_rank", "lora_scaling",
    "gradient_checkpointing", "checkpointing", "depformer_checkpointing", "betas", "depformer_betas",
    "positional_scale", "depformer_positional_scale", "extra_heads_dim", "depformer_context",
    "depformer_causal", "lm_config", "personaplex_fast", "version",
}


def check(raw: dict) -> None:
    """Raise ValueError naming the first key of `raw` (a flat config.json) that is of
    the wrong type, out of range, a setting not implemented, or unknown."""
    if not isinstance(raw, dict):
        raise ValueError("config.json must hold a JSON object")
    for key, value in raw.items():
        if key in MODELLED:
            _check_modelled(key, value)
        elif key in FIXED:
            if not any(value == v and type(value) is type(v) for v in FIXED[key]):
                allowed = " or ".join(_json(v) for v in FIXED[key])
                raise ValueError(f"{key} = {_json(value):.60} is not implemented (only {allowed})")
        elif key == "delays":
            if not (isinstance(value, list) and all(_is(d, _INT) and 0 <= d <= MAX_DELAY for d in value)):
                raise ValueError(f"delays must be a list of integers from 0 to {MAX_DELAY}")
        elif key == "text_card_out":  # a text head of another size than the text table
            if value is not None and value != raw.get("text_card", 32000):
                raise ValueError(f"text_card_out = {_json(value):.20} is not implemented (only null or "
                                 "text_card)")
        elif key not in NO_MATH:
            raise ValueError(f"unknown key {key!r:.60}: not a setting moshi's loaders read; remove it")


def _check_modelled(key: str, value) -> None:
    rule = MODELLED[key]
    if key == "depformer_dim_feedforward" and value is None:
        return
    kind = rule[0]
    if not _is(value, kind):
        raise ValueError(f"{key} must be {kind}, got {_json(value):.60}")
    if kind == _STR:
        if value not in rule[1]:
            raise ValueError(f"{key} = {value!r:.60} is not implemented (only "
                             f"{' or '.join(repr(v) for v in rule[1])})")
    elif kind != _BOOL and not rule[1] <= value <= rule[2]:
        raise ValueError(f"{key} = {value:g} is out of range ({rule[1]:g} to {rule[2]:g})")


def _json(value) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
