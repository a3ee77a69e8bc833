"""Model configuration: frozen dataclasses, the LM's and Mimi's.

The LM's are read from a checkpoint's config.json. Their field names follow the
official `lm_config` keys (the flat dict Kyutai's `config.json` files and
`moshi.models.loaders._lm_kwargs` use), so a config.json from either model repo
maps onto them without renaming. Every key is checked first (config_keys: types,
ranges, settings not implemented refused by name, keys without math accepted);
absent keys take the official PersonaPlex / Moshi 7B value.

Mimi's (MimiConfig) defaults are the official codec; a converted codec carries
its own as JSON in the safetensors metadata (mimi_checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import config_keys

# The three file names used by both official model repos.
LM_WEIGHTS = "model.safetensors"
MIMI_WEIGHTS = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER = "tokenizer_spm_32k_3.model"
CONFIG = "config.json"


@dataclass(frozen=True)
class ModelFiles:
    """A model's file names: the official repos' unless config.json gives others, as
    Kyutai's do (moshi_name, mimi_name, tokenizer_name: moshi's CheckpointInfo)."""

    lm: str = LM_WEIGHTS
    mimi: str = MIMI_WEIGHTS
    tokenizer: str = TEXT_TOKENIZER

    KEYS = (("lm", "moshi_name"), ("mimi", "mimi_name"), ("tokenizer", "tokenizer_name"))

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelFiles":
        if isinstance(raw.get("lm_config"), dict):
            raw = {**raw, **raw["lm_config"]}
        names = {}
        for field_name, key in cls.KEYS:
            name = raw.get(key)
            if name is None:
                continue
            if isinstance(name, str) and name.startswith("hf://"):
                raise ValueError(f"{key} = {name!r:.80} is a file of another repo, which is not read here: "
                                 "download it next to the others and name the local copy")
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise ValueError(f"{key} must be a file name in the model's folder, got {json.dumps(name):.60}")
            names[field_name] = name
        return cls(**names)


@dataclass(frozen=True)
class DepformerConfig:
    """The small transformer that emits the model's audio codebooks one by one."""

    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 6
    dim_feedforward: int = 4224  # int(4.125 * 1024)
    # One set of attention/FFN weights per codebook step ("weights per step").
    weights_per_step: bool = True
    # One input projection from the temporal output per codebook ("multi linear").
    multi_linear: bool = True
    # The official model uses no positional embedding in the depformer; its
    # attention spans the dep_q steps of one frame.
    pos_emb: str = "none"
    max_period: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return _gated_hidden(self.dim, self.dim_feedforward)


@dataclass(frozen=True)
class LMConfig:
    """The temporal transformer, its embeddings and heads, and the depformer."""

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10000.0
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    gating: str = "silu"
    text_card: int = 32000
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    card: int = 2048
    n_q: int = 16
    dep_q: int = 8
    delays: tuple[int, ...] = (0, 0) + (1,) * 7 + (0,) + (1,) * 7
    depformer: DepformerConfig = field(default_factory=DepformerConfig)

    def __post_init__(self):
        if len(self.delays) != self.n_q + 1:
            raise ValueError(
                f"config: {len(self.delays)} delays given, need n_q + 1 = {self.n_q + 1}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"config: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.norm not in ("rms_norm_f32", "rms_norm"):
            raise ValueError(f"config: norm {self.norm!r} is not supported (rms_norm_f32, rms_norm)")
        if self.gating != "silu":
            raise ValueError(f"config: gating {self.gating!r} is not supported (silu)")
        if self.positional_embedding != "rope":
            raise ValueError(
                f"config: positional_embedding {self.positional_embedding!r} is not supported (rope)"
            )
        d = self.depformer
        if min(self.dim, self.num_heads, self.num_layers, self.context, self.card, self.text_card,
               d.dim, d.num_heads, d.num_layers, d.dim_feedforward) < 1:
            raise ValueError("config: sizes must be positive")
        if not 1 <= self.dep_q < self.n_q:
            raise ValueError(f"config: dep_q {self.dep_q} must be from 1 to n_q - 1 = {self.n_q - 1} "
                             "(the rest are the user's streams; a PersonaPlex config.json says "
                             "model_type \"personaplex\", whose dep_q = n_q means half)")
        if self.head_dim % 2:
            raise ValueError(f"config: dim / num_heads = {self.head_dim} must be even (RoPE rotates pairs)")
        if d.dim % d.num_heads or (d.pos_emb == "rope" and d.head_dim % 2):
            raise ValueError(f"config: depformer_dim {d.dim} must be a multiple of depformer_num_heads "
                             f"{d.num_heads} (an even one with depformer_pos_emb 'rope')")
        if d.pos_emb not in ("none", "rope"):
            raise ValueError(f"config: depformer_pos_emb {d.pos_emb!r} is not supported (none, rope)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return _gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def norm_eps(self) -> float:
        # Moshi's float32 RMSNorm uses eps 1e-8, the plain one 1e-5.
        return 1e-8 if self.norm == "rms_norm_f32" else 1e-5

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def user_q(self) -> int:
        """Audio codebooks fed by the user stream (the ones the model does not emit)."""
        return self.n_q - self.dep_q

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.card

    def parameter_count(self) -> int:
        """The LM's weights (norm gains aside), from the layout in models/lm.py."""
        d = self.depformer
        ffn, dffn = self.ffn_hidden, d.ffn_hidden
        temporal = self.num_layers * (4 * self.dim**2 + 3 * self.dim * ffn)
        tables = (self.text_card + 1) * (self.dim + d.dim) + (self.card + 1) * (self.n_q * self.dim
                                                                                + (self.dep_q - 1) * d.dim)
        steps = self.dep_q if d.weights_per_step else 1
        depformer = steps * d.num_layers * (4 * d.dim**2 + 3 * d.dim * dffn)
        n_in = self.dep_q if d.multi_linear else 1
        heads = self.dim * self.text_card + n_in * self.dim * d.dim + self.dep_q * d.dim * self.card
        return temporal + tables + depformer + heads

    def kv_bytes(self, sessions: int = 1, itemsize: int = 2, kv_bits: int | None = None) -> int:
        """The temporal transformer's KV cache: keys and values of every layer over the context,
        in the activations' dtype (itemsize bytes), or kv_bits 8: a byte per value and a float32
        scale per (head, position) row (models/cache.py)."""
        row = self.head_dim + 4 if kv_bits == 8 else self.head_dim * itemsize
        return sessions * 2 * self.num_layers * self.context * self.num_heads * row

    def to_dict(self) -> dict:
        """The flat official layout (depformer fields prefixed), ready for config.json."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "depformer"}
        out["delays"] = list(self.delays)
        for f in dataclasses.fields(DepformerConfig):
            out[_DEP_KEYS.get(f.name, "depformer_" + f.name)] = getattr(self.depformer, f.name)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "LMConfig":
        """From the flat official layout, every key checked first (config_keys.check)."""
        config_keys.check(raw)
        dep = {}
        for f in dataclasses.fields(DepformerConfig):
            key = _DEP_KEYS.get(f.name, "depformer_" + f.name)
            if key in raw:
                dep[f.name] = raw[key]
        if "dim_feedforward" in dep and dep["dim_feedforward"] is None:  # as moshi reads null
            dep["dim_feedforward"] = int(raw.get("hidden_scale", cls.hidden_scale) * dep.get("dim", 1024))
        top = {}
        for f in dataclasses.fields(cls):
            if f.name in raw and f.name != "depformer":
                top[f.name] = raw[f.name]
        if "delays" in top:
            top["delays"] = tuple(int(d) for d in top["delays"])
        # PersonaPlex (its config.json says model_type "personaplex") builds its generator
        # with dep_q = n_q = 16: the depformer also predicts the user's 8 codebooks, which
        # the duplex loop always overwrites with the user's real codes. The model's own
        # streams are the first half. Any other model with dep_q = n_q generates every
        # stream (no user's), which is no duplex model: refused by the range check.
        if raw.get("model_type") == "personaplex" and top.get("dep_q") == top.get("n_q", cls.n_q):
            top["dep_q"] = top["dep_q"] // 2
        return cls(depformer=DepformerConfig(**dep), **top)

    @classmethod
    def load(cls, path: str | Path) -> "LMConfig":
        """Read `config.json` from a checkpoint directory (or the file itself).

        A directory without config.json gets the official 7B configuration.
        """
        path = Path(path)
        file = path / CONFIG if path.is_dir() else path
        if not file.exists():
            return cls()
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if "lm_config" in raw and isinstance(raw["lm_config"], dict):
            raw = {**raw, **raw["lm_config"]}
        return cls.from_dict(raw)


# Official names of the depformer fields that are not simply "depformer_<field>".
_DEP_KEYS = {
    "pos_emb": "depformer_pos_emb",
    "dim": "depformer_dim",
    "dim_feedforward": "depformer_dim_feedforward",
}


def _gated_hidden(dim: int, dim_feedforward: int) -> int:
    # Moshi's gated FFN keeps 2/3 of the nominal width (one matrix becomes two),
    # with 21/8 * dim as the special case for a nominal 4 * dim.
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


# ------------------------------------------------------------------------------- Mimi


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder runs them reversed
    n_residual_layers: int = 1
    compress: int = 2
    dilation_base: int = 2
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # steps of 40 ms (the transformers run at the 25 Hz encoder rate)
    layer_scale: float = 0.01
    max_period: float = 10000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    bins: int = 2048
    n_q: int = 32  # codebooks stored in the checkpoint
    n_q_semantic: int = 1
    epsilon: float = 1e-5  # floor of cluster_usage when turning EMA sums into centroids


@dataclass(frozen=True)
class MimiConfig:
    """Defaults are the official Mimi (tokenizer-e351c8d8-checkpoint125) as PersonaPlex uses it."""

    sample_rate: int = 24000
    frame_rate: float = 12.5
    num_codebooks: int = 8  # codebooks used: PersonaPlex/Moshi model 8 of the 32 stored
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def hop_length(self) -> int:
        return math.prod(self.seanet.ratios)

    @property
    def resample_stride(self) -> int:
        """Encoder-rate steps per codec frame (2: 25 Hz -> 12.5 Hz)."""
        return self.frame_size // self.hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "MimiConfig":
        seanet = dict(d.get("seanet", {}))
        if "ratios" in seanet:
            seanet["ratios"] = tuple(seanet["ratios"])
        return MimiConfig(
            **{k: v for k, v in d.items() if k not in ("seanet", "transformer", "quantizer")},
            seanet=SeanetConfig(**seanet),
            transformer=MimiTransformerConfig(**d.get("transformer", {})),
            quantizer=QuantizerConfig(**d.get("quantizer", {})))
