"""A GPT-2 Transformer (Radford et al. 2019) with hooks to inject latent codes, and a KV cache.

The architecture is GPT-2's, pre-LayerNorm, with learned positions and tied output embeddings:

  h_0 = Dropout(wte[x_t] + wpe[t] (+ o))                        o: optional embedding offset
  a_l = h_{l-1} + Dropout(c_proj(Attn(ln_1(h_{l-1}))))
  h_l = a_l + Dropout(mlp_c_proj(gelu_tanh(c_fc(ln_2(a_l)))))
  logits_t = ln_f(h_L)_t · wteᵀ

Attn is multi-head attention with q, k, v = split(c_attn(x), 3) (in that order), head h using
columns h·dh … (h+1)·dh − 1 of each, scores q·k / sqrt(dh), a float32 softmax, attention
dropout, causal and key-padding masks. Initialisation follows GPT-2: N(0, 0.02²) kernels and
embeddings, zero biases, unit LayerNorm scales, and the two residual projections (`c_proj`)
drawn with std 0.02 / sqrt(2 L). Parameter names mirror GPT-2's (`wte`, `wpe`, `h_0` … with
`ln_1`, `attn/c_attn`, `attn/c_proj`, `ln_2`, `mlp/c_fc`, `mlp/c_proj`, and `ln_f`), so loading
a checkpoint (`vae_jax.nn.gpt2`) is a name-by-name mapping.

Ways for a latent code to enter (all optional, all per call):

* Value fusion (DELLA; Hu et al., NAACL 2022, "Fuse It More Deeply! A Variational Transformer
  with Layer-Wise Latent Variable Inference for Text Generation"): layer l's attention values
  v ∈ R^D (before the heads are split) are replaced, given that layer's latent z_l ∈ R^d, by
    'low_rank':  ṽ = (Σ_{j=1..r} A_j [v; 1]) ⊙ (Σ_{j=1..r} B_j [z_l; 1]),
                 A_j: R^{D+1} → R^D, B_j: R^{d+1} → R^D,
    which is the official DELLA code's LMF layer: the r factors are summed *before* the
    elementwise product (Liu et al. 2018's LMF sums the r products instead). Each A_j [v; 1] is
    an affine map of v, and a sum of r affine maps is itself one affine map, so
    ṽ = (A [v; 1]) ⊙ (B [z_l; 1]) with A = Σ_j A_j, B = Σ_j B_j: r changes only the
    parameterisation and the initialisation, not what the layer can compute. The layer sums
    the factors first and then does one matrix product each.
    'add':       ṽ = v + W z_l + b  (the paper's ablation without the low-rank fusion).
  Without latents the values are untouched (the fusion parameters still exist), so the same
  module serves as DELLA's encoder (no latents, `causal=False`) and decoder.
* Memory (Optimus, Li et al. 2020, "latent as memory"): M extra vectors per layer that every
  query attends to, each used both as key and as value (split into heads like k and v), never
  masked and without a position.
* Embedding offset (Optimus, "latent as embedding"): one vector added to every position's input
  embedding, before the embedding dropout.

Decoding uses a KV cache (`init_cache`, `decode_step`): keys and (fused) values of the positions
seen so far, written at the running index; `make_step_fn` turns a model into the step function
of `vae_jax.nn.decoding`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

ValueFusion = Literal["none", "low_rank", "add"]
FusionInit = Literal["torch_linear", "normal"]
Cache = dict[str, jax.Array]
DecodeState = dict[str, Any]

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes, rates and latent-injection switches of the Transformer. Defaults are a small model;
  GPT-2 small is num_layers=12, num_heads=12, model_dim=768, max_length=1024, vocab 50257.

  mlp_dim: hidden size of the MLP, None for 4 · model_dim.
  max_length: number of learned positions.
  latent_dim: size d of each layer's latent z_l for the value fusion (0: no fusion).
  value_fusion: how z_l enters layer l's attention values ('none', 'low_rank', 'add'; above).
  fusion_rank: r of the 'low_rank' fusion.
  fusion_init: 'torch_linear' draws every fusion parameter from U(±1/sqrt(fan_in)), PyTorch's
    nn.Linear default, with fan_in = D + 1 for A_j and d + 1 for B_j (the row acting on the
    constant 1 takes the place of nn.Linear's bias; 'add': fan_in = d for W and b). 'normal'
    draws them from N(0, initializer_range²) (the 'add' bias b = 0): what the official DELLA
    code's factors start from in effect, since its GPT-2 `init_weights()` re-initialises every
    nn.Linear of the model, the LMF factors included, that way (with zero biases).
  dtype: computation dtype ('float32', 'bfloat16', 'float16'); parameters stay float32 and the
    attention softmax and LayerNorm statistics are computed in float32.
  """
  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  model_dim: int = 256
  mlp_dim: int | None = None
  max_length: int = 256
  embed_dropout: float = 0.1
  attention_dropout: float = 0.1
  residual_dropout: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  latent_dim: int = 0
  value_fusion: ValueFusion = "none"
  fusion_rank: int = 4
  fusion_init: FusionInit = "torch_linear"
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "num_heads", "model_dim", "max_length"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.model_dim % self.num_heads:
      raise ValueError(f"model_dim ({self.model_dim}) must be divisible by num_heads "
                       f"({self.num_heads})")
    if self.mlp_dim is not None and self.mlp_dim < 1:
      raise ValueError(f"mlp_dim must be positive or None (4 * model_dim), got {self.mlp_dim}")
    for name in ("embed_dropout", "attention_dropout", "residual_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.layer_norm_epsilon <= 0 or self.initializer_range <= 0:
      raise ValueError("layer_norm_epsilon and initializer_range must be positive")
    if self.value_fusion not in ("none", "low_rank", "add"):
      raise ValueError(f"unknown value_fusion {self.value_fusion!r}; use 'none', 'low_rank' "
                       "or 'add'")
    if self.latent_dim < 0:
      raise ValueError(f"latent_dim must be >= 0, got {self.latent_dim}")
    if (self.value_fusion != "none") != (self.latent_dim > 0):
      raise ValueError(f"value_fusion {self.value_fusion!r} with latent_dim={self.latent_dim}: "
                       "a fusion needs latent_dim > 0, and latents are only read by a fusion")
    if self.value_fusion == "low_rank" and self.fusion_rank < 1:
      raise ValueError(f"fusion_rank must be positive, got {self.fusion_rank}")
    if self.fusion_init not in ("torch_linear", "normal"):
      raise ValueError(f"unknown fusion_init {self.fusion_init!r}; use 'torch_linear' or "
                       "'normal'")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")

  @property
  def head_dim(self) -> int:
    return self.model_dim // self.num_heads

  @property
  def inner_dim(self) -> int:
    return self.mlp_dim or 4 * self.model_dim

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


@flax.struct.dataclass
class TransformerOutput:
  """hidden: `[B, T, D]` the final states (after ln_f); layers: `[L, B, T, D]` every block's
  output (before ln_f)."""
  hidden: jax.Array
  layers: jax.Array


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """`[B, T, D]` -> `[B, T, H, D/H]`, head h holding columns h·dh … (h+1)·dh − 1."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _dense(config: TransformerConfig, features: int, std: float, **kwargs) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.normal(std),
                  bias_init=nn.initializers.zeros, dtype=config.compute_dtype, **kwargs)


def _layer_norm(config: TransformerConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype,
                      use_fast_variance=False)


def _fusion_init(config: TransformerConfig, fan_in: int, bias: bool = False):
  if config.fusion_init == "normal":
    return nn.initializers.zeros if bias else nn.initializers.normal(config.initializer_range)
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LatentValueFusion(nn.Module):
  """ṽ = fusion(v, z) of the module docstring: v `[B, T, D]`, z `[B, d]` -> `[B, T, D]`.

  'low_rank' stores the factors as `value_factors` `[r, D+1, D]` (A_j, acting on [v; 1] from
  the right) and `latent_factors` `[r, d+1, D]` (B_j); 'add' stores `kernel` `[d, D]` and `bias`.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, v: jax.Array, z: jax.Array) -> jax.Array:
    c, dt = self.config, self.config.compute_dtype
    d_model, d_latent = v.shape[-1], z.shape[-1]
    z = z.astype(dt)
    if c.value_fusion == "low_rank":
      a = self.param("value_factors", _fusion_init(c, d_model + 1),
                     (c.fusion_rank, d_model + 1, d_model))
      b = self.param("latent_factors", _fusion_init(c, d_latent + 1),
                     (c.fusion_rank, d_latent + 1, d_model))
      a, b = jnp.sum(a, axis=0).astype(dt), jnp.sum(b, axis=0).astype(dt)
      return (v @ a[:-1] + a[-1]) * (z @ b[:-1] + b[-1])[:, None, :]
    kernel = self.param("kernel", _fusion_init(c, d_latent), (d_latent, d_model))
    bias = self.param("bias", _fusion_init(c, d_latent, bias=True), (d_model,))
    return v + (z @ kernel.astype(dt) + bias.astype(dt))[:, None, :]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           dropout: nn.Dropout | None = None, deterministic: bool = True) -> jax.Array:
  """Multi-head softmax(q·kᵀ / sqrt(dh)) v: q `[B, T, H, dh]`, k and v `[B, S, H, dh]`, mask
  `[B, T, S]` (True = may attend) -> `[B, T, H, dh]`.

  Scores are float32; masked scores are the float32 minimum, so a row without any allowed key
  is a uniform average instead of NaN.
  """
  scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


class Attention(nn.Module):
  """GPT-2's self-attention (causal or not, by the mask) with the value fusion and the memory."""
  config: TransformerConfig

  def setup(self):
    c = self.config
    self.c_attn = _dense(c, 3 * c.model_dim, c.initializer_range)
    self.c_proj = _dense(c, c.model_dim, c.initializer_range / math.sqrt(2 * c.num_layers))
    if c.value_fusion != "none":
      self.fusion = LatentValueFusion(c)
    self.dropout = nn.Dropout(c.attention_dropout)

  def _qkv(self, x: jax.Array, latent: jax.Array | None):
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    if self.config.value_fusion != "none":
      if latent is not None:
        v = self.fusion(v, latent)
      elif self.is_initializing():  # create the fusion parameters even when called without z
        self.fusion(v, jnp.zeros((x.shape[0], self.config.latent_dim), v.dtype))
    h = self.config.num_heads
    return _split_heads(q, h), _split_heads(k, h), _split_heads(v, h)

  def _attend(self, q, k, v, mask, memory, deterministic):
    if memory is not None:  # [B, M, D]: keys and values at once, attended from every query
      m = _split_heads(memory.astype(k.dtype), self.config.num_heads)
      k, v = jnp.concatenate([m, k], axis=1), jnp.concatenate([m, v], axis=1)
      mask = jnp.concatenate([jnp.ones((*mask.shape[:2], m.shape[1]), bool), mask], axis=-1)
    out = attend(q, k, v, mask, self.dropout, deterministic)
    return self.c_proj(out.reshape(*out.shape[:2], -1))

  def __call__(self, x: jax.Array, mask: jax.Array, latent: jax.Array | None = None,
               memory: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """x `[B, T, D]`, mask `[B, T, T]`, latent `[B, d]`, memory `[B, M, D]` -> `[B, T, D]`."""
    q, k, v = self._qkv(x, latent)
    return self._attend(q, k, v, mask, memory, deterministic)

  def step(self, x: jax.Array, keys: jax.Array, values: jax.Array, index: jax.Array,
           latent: jax.Array | None = None, memory: jax.Array | None = None):
    """One position: x `[B, 1, D]` at `index` `[B]`; keys/values `[B, S, H, dh]` the cache.
    Writes this position's key and (fused) value at `index` and attends to positions <= index.
    Returns (output `[B, 1, D]`, keys, values)."""
    q, k, v = self._qkv(x, latent)
    rows = jnp.arange(x.shape[0])
    keys = keys.at[rows, index].set(k[:, 0].astype(keys.dtype))
    values = values.at[rows, index].set(v[:, 0].astype(values.dtype))
    mask = (jnp.arange(keys.shape[1])[None, :] <= index[:, None])[:, None, :]
    return self._attend(q, keys, values, mask, memory, True), keys, values


class MLP(nn.Module):
  """mlp_c_proj(gelu_tanh(c_fc(x))), GPT-2's 'gelu_new' (the tanh approximation)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    x = _dense(c, c.inner_dim, c.initializer_range, name="c_fc")(x)
    x = jax.nn.gelu(x, approximate=True)
    return _dense(c, c.model_dim, c.initializer_range / math.sqrt(2 * c.num_layers),
                  name="c_proj")(x)


class Block(nn.Module):
  """One pre-LN block: a = x + Dropout(attn(ln_1(x))); a + Dropout(mlp(ln_2(a)))."""
  config: TransformerConfig

  def setup(self):
    self.ln_1 = _layer_norm(self.config)
    self.attn = Attention(self.config)
    self.ln_2 = _layer_norm(self.config)
    self.mlp = MLP(self.config)
    self.dropout = nn.Dropout(self.config.residual_dropout)

  def __call__(self, x, mask, latent=None, memory=None, deterministic=True):
    drop = functools.partial(self.dropout, deterministic=deterministic)
    x = x + drop(self.attn(self.ln_1(x), mask, latent, memory, deterministic))
    return x + drop(self.mlp(self.ln_2(x)))

  def step(self, x, keys, values, index, latent=None, memory=None):
    a, keys, values = self.attn.step(self.ln_1(x), keys, values, index, latent, memory)
    x = x + a
    return x + self.mlp(self.ln_2(x)), keys, values


def _layer(x: jax.Array | None, l: int) -> jax.Array | None:
  return None if x is None else x[:, l]


class Transformer(nn.Module):
  """GPT-2 with per-call latents, memory and embedding offset (module docstring)."""
  config: TransformerConfig

  def setup(self):
    c = self.config
    init = nn.initializers.normal(c.initializer_range)
    self.wte = nn.Embed(c.vocab_size, c.model_dim, embedding_init=init, dtype=c.compute_dtype)
    self.wpe = nn.Embed(c.max_length, c.model_dim, embedding_init=init, dtype=c.compute_dtype)
    self.dropout = nn.Dropout(c.embed_dropout)
    self.h = [Block(c) for _ in range(c.num_layers)]
    self.ln_f = _layer_norm(c)

  def _check(self, batch: int, latents, memory, embedding_offset):
    c = self.config
    if latents is not None:
      if c.value_fusion == "none":
        raise ValueError("latents were given but the config has value_fusion='none'")
      if latents.shape != (batch, c.num_layers, c.latent_dim):
        raise ValueError(f"latents must be [B, L, d] = {(batch, c.num_layers, c.latent_dim)}, "
                         f"got {latents.shape}")
    if memory is not None and (memory.ndim != 4 or memory.shape[:2] != (batch, c.num_layers)
                               or memory.shape[-1] != c.model_dim):
      raise ValueError(f"memory must be [B, L, M, D] with B, L, D = "
                       f"{(batch, c.num_layers, c.model_dim)}, got {memory.shape}")
    if embedding_offset is not None and embedding_offset.shape != (batch, c.model_dim):
      raise ValueError(f"embedding_offset must be [B, D] = {(batch, c.model_dim)}, "
                       f"got {embedding_offset.shape}")

  def _embed(self, tokens, positions, embedding_offset):
    x = self.wte(tokens) + self.wpe(positions)
    if embedding_offset is not None:
      x = x + embedding_offset.astype(x.dtype)[:, None, :]
    return x

  def __call__(self, tokens: jax.Array, *, padding_mask: jax.Array | None = None,
               causal: bool = True, latents: jax.Array | None = None,
               memory: jax.Array | None = None, embedding_offset: jax.Array | None = None,
               deterministic: bool = True) -> TransformerOutput:
    """Encodes `tokens` `[B, T]` (positions 0 … T−1).

    Args:
      padding_mask: `[B, T]` True at real tokens; keys at False positions are never attended
        (None: all real).
      causal: position t attends to positions <= t only (False: to all real positions).
      latents: `[B, L, d]`, z_l for layer l's value fusion.
      memory: `[B, L, M, D]`, layer l's M memory vectors.
      embedding_offset: `[B, D]`, added to every input embedding.
    """
    c = self.config
    batch, length = tokens.shape
    if length > c.max_length:
      raise ValueError(f"sequence length {length} exceeds max_length {c.max_length}")
    self._check(batch, latents, memory, embedding_offset)
    keep = (jnp.ones((batch, length), bool) if padding_mask is None
            else padding_mask.astype(bool))
    mask = jnp.broadcast_to(keep[:, None, :], (batch, length, length))
    if causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))
    x = self._embed(tokens, jnp.arange(length)[None, :], embedding_offset)
    x = self.dropout(x, deterministic=deterministic)
    layers = []
    for l, block in enumerate(self.h):
      x = block(x, mask, _layer(latents, l), _layer(memory, l), deterministic)
      layers.append(x)
    return TransformerOutput(hidden=self.ln_f(x), layers=jnp.stack(layers))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Tied output layer: `[..., D]` -> `[..., V]`, hidden · wteᵀ (no bias)."""
    return self.wte.attend(hidden)

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """An empty KV cache for `max_length` positions: {'key', 'value'}: `[B, L, S, H, dh]` and
    'index': `[B]` int32, the position the next `decode_step` writes (batch-leading leaves, as
    `vae_jax.nn.decoding` expects of a state). Needs no parameters."""
    c = self.config
    if max_length > c.max_length:
      raise ValueError(f"cache length {max_length} exceeds max_length {c.max_length}")
    shape = (batch_size, c.num_layers, max_length, c.num_heads, c.head_dim)
    zeros = jnp.zeros(shape, c.compute_dtype)
    return {"key": zeros, "value": zeros, "index": jnp.zeros((batch_size,), jnp.int32)}

  def decode_step(self, cache: Cache, token: jax.Array, *, latents: jax.Array | None = None,
                  memory: jax.Array | None = None,
                  embedding_offset: jax.Array | None = None) -> tuple[Cache, jax.Array]:
    """Runs `token` `[B]` at position `cache['index']` (causal, deterministic): returns the
    updated cache and the final state `[B, D]` (after ln_f). The cache holds fused values, so
    `latents` must be the same at every step; memory and offset are read at every step.
    A cache of length S serves S steps (the keys and values of later ones are not stored)."""
    self._check(token.shape[0], latents, memory, embedding_offset)
    index = cache["index"]
    x = self._embed(token[:, None], index[:, None], embedding_offset)
    keys, values = cache["key"], cache["value"]
    for l, block in enumerate(self.h):
      x, k, v = block.step(x, keys[:, l], values[:, l], index, _layer(latents, l),
                           _layer(memory, l))
      keys, values = keys.at[:, l].set(k), values.at[:, l].set(v)
    return {"key": keys, "value": values, "index": index + 1}, self.ln_f(x[:, 0])

  def step(self, state: DecodeState, token: jax.Array) -> tuple[DecodeState, jax.Array]:
    """`decode_step` + `logits` over a `DecodeState` (see `initial_decode_state`)."""
    cache, hidden = self.decode_step(state["cache"], token, latents=state.get("latents"),
                                     memory=state.get("memory"),
                                     embedding_offset=state.get("embedding_offset"))
    return {**state, "cache": cache}, self.logits(hidden)


def initial_decode_state(model: Transformer, batch_size: int, max_length: int, *,
                         latents: jax.Array | None = None, memory: jax.Array | None = None,
                         embedding_offset: jax.Array | None = None) -> DecodeState:
  """The state of `make_step_fn`: an empty cache plus the conditioning of every step. Keeping
  the conditioning in the state lets beam search tile and reorder it with the cache."""
  return {"cache": model.init_cache(batch_size, max_length), "latents": latents,
          "memory": memory, "embedding_offset": embedding_offset}


def make_step_fn(model: Transformer, variables: Any):
  """The `vae_jax.nn.decoding` step function `(state, prev_token [N]) -> (state, logits [N, V])`
  of `model` with `variables`, over states from `initial_decode_state`. For example
  `decoding.greedy_decode(make_step_fn(model, variables),
  initial_decode_state(model, n, t, latents=z), n, t)`."""
  return functools.partial(model.apply, variables, method=Transformer.step)
