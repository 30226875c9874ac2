"""A plain numpy GPT-2 forward pass in float64 on Hugging Face tensor names (`wte.weight`,
`h.{i}.attn.c_attn.weight`, …), written from the GPT-2 definition with explicit loops over
examples and heads: the independent reference of tests/nn/test_transformer.py and
tests/nn/test_gpt2.py. It also implements the Transformer's latent hooks in their plainest
form (a per-layer function of the values, an explicitly concatenated memory, an added offset).
"""

import numpy as np


def layer_norm(x, weight, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu_new(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def num_layers(tensors):
  return sum(1 for name in tensors if name.endswith(".ln_1.weight"))


def forward(tensors, tokens, num_heads, *, padding_mask=None, causal=True, value_fn=None,
            memory=None, embedding_offset=None, eps=1e-5):
  """GPT-2 on `tokens` `[B, T]` -> (final states after ln_f `[B, T, D]`, block outputs
  `[L, B, T, D]`).

  value_fn(l, v): replaces layer l's values `[B, T, D]`; memory `[B, L, M, D]`: vectors
  prepended to every layer's keys and values; embedding_offset `[B, D]`: added to the input
  embeddings. Query rows with no key to attend to are NaN.
  """
  t = {name: np.asarray(value, np.float64) for name, value in tensors.items()}
  tokens = np.asarray(tokens)
  b_size, length = tokens.shape
  d = t["wte.weight"].shape[1]
  dh = d // num_heads
  keep = np.ones((b_size, length), bool) if padding_mask is None else np.asarray(padding_mask)
  x = t["wte.weight"][tokens] + t["wpe.weight"][np.arange(length)][None]
  if embedding_offset is not None:
    x = x + np.asarray(embedding_offset, np.float64)[:, None, :]
  layers = []
  for l in range(num_layers(t)):
    p = lambda name: t[f"h.{l}.{name}"]
    h = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
    qkv = h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    if value_fn is not None:
      v = np.asarray(value_fn(l, v), np.float64)
    attn = np.zeros_like(q)
    for b in range(b_size):
      allowed = np.array([[keep[b, s] and (not causal or s <= i) for s in range(length)]
                          for i in range(length)])
      keys, values = k[b], v[b]
      if memory is not None:
        mem = np.asarray(memory, np.float64)[b, l]
        keys, values = np.concatenate([mem, keys]), np.concatenate([mem, values])
        allowed = np.concatenate([np.ones((length, len(mem)), bool), allowed], axis=1)
      for head in range(num_heads):
        cols = slice(head * dh, (head + 1) * dh)
        scores = q[b][:, cols] @ keys[:, cols].T / np.sqrt(dh)
        scores = np.where(allowed, scores, -np.inf)
        with np.errstate(invalid="ignore"):
          weights = np.exp(scores - scores.max(-1, keepdims=True))
          weights = weights / weights.sum(-1, keepdims=True)
        attn[b][:, cols] = weights @ values[:, cols]
    a = x + attn @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
    h = layer_norm(a, p("ln_2.weight"), p("ln_2.bias"), eps)
    x = a + gelu_new(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") \
        + p("mlp.c_proj.bias")
    layers.append(x)
  return layer_norm(x, t["ln_f.weight"], t["ln_f.bias"], eps), np.stack(layers)


def logits(tensors, hidden):
  """GPT-2's tied output layer."""
  return hidden @ np.asarray(tensors["wte.weight"], np.float64).T


def tensors_from_params(params):
  """GPT-2 tensors (HF names) of a Transformer's parameter tree."""
  tensors = {"wte.weight": params["wte"]["embedding"], "wpe.weight": params["wpe"]["embedding"],
             "ln_f.weight": params["ln_f"]["scale"], "ln_f.bias": params["ln_f"]["bias"]}
  i = 0
  while f"h_{i}" in params:
    block = params[f"h_{i}"]
    for name, module in (("ln_1", block["ln_1"]), ("ln_2", block["ln_2"])):
      tensors[f"h.{i}.{name}.weight"] = module["scale"]
      tensors[f"h.{i}.{name}.bias"] = module["bias"]
    for name, module in (("attn.c_attn", block["attn"]["c_attn"]),
                         ("attn.c_proj", block["attn"]["c_proj"]),
                         ("mlp.c_fc", block["mlp"]["c_fc"]),
                         ("mlp.c_proj", block["mlp"]["c_proj"])):
      tensors[f"h.{i}.{name}.weight"] = module["kernel"]
      tensors[f"h.{i}.{name}.bias"] = module["bias"]
    i += 1
  return {name: np.asarray(value) for name, value in tensors.items()}
