"""GPT-2 weights for `vae_jax.nn.transformer.Transformer`, from and to checkpoint directories in
the Hugging Face layout (`config.json` + `model.safetensors`), read with safetensors' numpy API.

Tensor names map one to one onto the Transformer's parameters (`h.{i}.attn.c_attn.weight` ->
`h_{i}/attn/c_attn/kernel`, LayerNorm `weight` -> `scale`). HF's Conv1D stores its weight as
`[in, out]`, which is already a flax Dense kernel, so no tensor is transposed. Buffers
(`h.{i}.attn.bias`, `h.{i}.attn.masked_bias`) are ignored; `lm_head.weight` is GPT-2's tied
output layer and must equal `wte.weight` (the Transformer has no separate head).

Vocabulary. Ids 0 … 3 of this project are PAD, BOS, EOS, UNK (`vae_jax.data.vocab`), so GPT-2
token g is project id g + ID_OFFSET and the project's vocabulary has GPT-2's size + 4. The four
new embedding rows start as: BOS and EOS = GPT-2's `<|endoftext|>` row (GPT-2's own
start/end-of-text token; its id is `eos_token_id`, else `bos_token_id`, of config.json, else
the last row), PAD = zeros (padding is masked everywhere), UNK = the mean of GPT-2's rows.
Because the output layer is tied, the logits of ids >= ID_OFFSET are GPT-2's logits.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from flax import traverse_util
from flax.core import frozen_dict

from vae_jax.data.bpe import ID_OFFSET  # GPT-2 id g is project id g + ID_OFFSET
from vae_jax.data.vocab import BOS, EOS, UNK
from vae_jax.nn.transformer import TransformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# Activations equal to the tanh approximation of GELU that the Transformer computes.
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# transformers.GPT2Config's defaults, for keys a config.json leaves out.
_HF_DEFAULTS = {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
                "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02}
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_PREFIX = "transformer."
_BLOCK_TENSORS = {  # HF name inside h.{i} -> path inside h_{i}
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"),
    "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"), "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}

Path = str | os.PathLike


def _read_hf_config(path_or_dict: Path | Mapping[str, Any]) -> dict[str, Any]:
  """config.json as a dict: given as a dict, as the file, or as its directory."""
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict)
  path = pathlib.Path(path_or_dict)
  if path.is_dir():
    path = path / CONFIG_FILE
  return json.loads(path.read_text())


def config_from_hf(path_or_dict: Path | Mapping[str, Any], **overrides) -> TransformerConfig:
  """The TransformerConfig of a GPT-2 config.json (a dict, the file or its directory), in this
  project's vocabulary (GPT-2's size + ID_OFFSET). Keys it leaves out take transformers'
  GPT2Config defaults; `overrides` set any TransformerConfig field (dropouts, latent settings).
  """
  given = _read_hf_config(path_or_dict)
  hf = {**_HF_DEFAULTS, **given}
  if hf.get("model_type", "gpt2") != "gpt2":
    raise ValueError(f"not a GPT-2 config: model_type {hf['model_type']!r}")
  if hf["activation_function"] not in _GELU_TANH:
    raise ValueError(f"activation_function {hf['activation_function']!r} is not supported: the "
                     f"Transformer computes the tanh approximation of GELU ({_GELU_TANH})")
  unsupported = [key for key, ok in (("scale_attn_weights", True),
                                     ("scale_attn_by_inverse_layer_idx", False),
                                     ("add_cross_attention", False)) if hf.get(key, ok) != ok]
  if unsupported:
    options = ", ".join(f"{key}={hf[key]}" for key in unsupported)
    raise ValueError(f"unsupported GPT-2 options: {options}")
  fields = dict(
      vocab_size=hf["vocab_size"] + ID_OFFSET, num_layers=hf["n_layer"], num_heads=hf["n_head"],
      model_dim=hf["n_embd"], mlp_dim=hf["n_inner"],
      max_length=given.get("n_positions") or given.get("n_ctx") or 1024,
      embed_dropout=hf["embd_pdrop"], attention_dropout=hf["attn_pdrop"],
      residual_dropout=hf["resid_pdrop"], layer_norm_epsilon=hf["layer_norm_epsilon"],
      initializer_range=hf["initializer_range"])
  return TransformerConfig(**{**fields, **overrides})


def _tensor_paths(num_layers: int) -> dict[str, tuple[str, ...]]:
  """HF tensor name -> path in the Transformer's params."""
  paths = {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe", "embedding"),
           "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")}
  for i in range(num_layers):
    paths.update({f"h.{i}.{name}": (f"h_{i}", *path) for name, path in _BLOCK_TENSORS.items()})
  return paths


def _tensor_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """The HF shape of every tensor (`wte.weight` in GPT-2's vocabulary)."""
  d, inner = config.model_dim, config.inner_dim
  block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
           "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
           "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
           "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,),
           "mlp.c_proj.weight": (inner, d), "mlp.c_proj.bias": (d,)}
  shapes = {"wte.weight": (config.vocab_size - ID_OFFSET, d), "wpe.weight": (config.max_length, d),
            "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(config.num_layers):
    shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
  return shapes


def _read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors`, or of the shards its index lists."""
  if (directory / WEIGHTS_FILE).exists():
    return safetensors.numpy.load_file(directory / WEIGHTS_FILE)
  if (directory / WEIGHTS_INDEX_FILE).exists():
    index = json.loads((directory / WEIGHTS_INDEX_FILE).read_text())
    return {name: value for shard in sorted(set(index["weight_map"].values()))
            for name, value in safetensors.numpy.load_file(directory / shard).items()}
  raise FileNotFoundError(f"no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}) in {directory}")


def special_rows(wte: np.ndarray, endoftext_id: int) -> np.ndarray:
  """The `[ID_OFFSET, D]` embedding rows of PAD, BOS, EOS, UNK from GPT-2's `wte` (module
  docstring)."""
  rows = np.zeros((ID_OFFSET, wte.shape[1]), wte.dtype)
  rows[BOS] = rows[EOS] = wte[endoftext_id]
  rows[UNK] = wte.mean(axis=0)
  return rows


def load_gpt2_params(checkpoint_dir: Path,
                     config: TransformerConfig | None = None) -> tuple[TransformerConfig, dict]:
  """(config, params) of a GPT-2 checkpoint directory: the Transformer's parameter tree (wte,
  wpe, h_i, ln_f; float32) in this project's vocabulary. `config` defaults to
  `config_from_hf(checkpoint_dir)`; a given config must match the tensors' shapes. Tensor names
  may carry the `transformer.` prefix. Missing, unexpected and mis-shaped tensors are reported
  together in one ValueError.
  """
  directory = pathlib.Path(checkpoint_dir)
  hf = _read_hf_config(directory)
  config = config or config_from_hf(hf)
  tensors = {name.removeprefix(_PREFIX): value for name, value in _read_tensors(directory).items()}
  lm_head = tensors.pop("lm_head.weight", None)
  tensors = {name: value for name, value in tensors.items() if not _BUFFER.fullmatch(name)}
  shapes = _tensor_shapes(config)
  missing = sorted(set(shapes) - set(tensors))
  unexpected = sorted(set(tensors) - set(shapes))
  mis_shaped = sorted(f"{name}: {tensors[name].shape}, expected {shapes[name]}"
                      for name in set(shapes) & set(tensors) if tensors[name].shape != shapes[name])
  if missing or unexpected or mis_shaped:
    problems = [f"{label}: {', '.join(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped))
                if names]
    raise ValueError(f"checkpoint {directory} does not fit the GPT-2 of {config}: "
                     + "; ".join(problems))
  if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
    raise ValueError("lm_head.weight differs from wte.weight: the Transformer ties its output "
                     "layer to wte and cannot represent an untied head")
  tensors = {name: np.asarray(value, np.float32) for name, value in tensors.items()}
  wte = tensors["wte.weight"]
  endoftext = next((hf[key] for key in ("eos_token_id", "bos_token_id")
                    if hf.get(key) is not None), len(wte) - 1)
  if not 0 <= endoftext < len(wte):
    raise ValueError(f"<|endoftext|> id {endoftext} outside GPT-2's vocabulary of {len(wte)}")
  tensors["wte.weight"] = np.concatenate([special_rows(wte, endoftext), wte])
  paths = _tensor_paths(config.num_layers)
  return config, traverse_util.unflatten_dict(
      {path: jnp.asarray(tensors[name]) for name, path in paths.items()})


def save_gpt2_checkpoint(params: Mapping[str, Any], config: TransformerConfig,
                         directory: Path) -> None:
  """Writes the GPT-2 part of a Transformer's params (`wte` without its ID_OFFSET special rows,
  wpe, h_i, ln_f; nothing else, e.g. no fusion parameters) as `model.safetensors` (float32,
  names without prefix) plus a GPT-2 `config.json`, the inverse of `load_gpt2_params` up to the
  special rows, which loading rebuilds."""
  if config.vocab_size <= ID_OFFSET:
    raise ValueError(f"vocab_size {config.vocab_size} has no room beyond the special tokens")
  flat = traverse_util.flatten_dict(frozen_dict.unfreeze(params))
  paths = _tensor_paths(config.num_layers)
  missing = ["/".join(path) for path in paths.values() if path not in flat]
  if missing:
    raise ValueError(f"params lack GPT-2 parameters: {', '.join(missing)}")
  tensors = {name: np.ascontiguousarray(np.asarray(flat[path], np.float32))
             for name, path in paths.items()}
  tensors["wte.weight"] = np.ascontiguousarray(tensors["wte.weight"][ID_OFFSET:])
  gpt2_vocab = config.vocab_size - ID_OFFSET
  hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": gpt2_vocab,
        "n_positions": config.max_length, "n_ctx": config.max_length, "n_embd": config.model_dim,
        "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": config.mlp_dim,
        "activation_function": "gelu_new", "resid_pdrop": config.residual_dropout,
        "embd_pdrop": config.embed_dropout, "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.initializer_range,
        "bos_token_id": gpt2_vocab - 1, "eos_token_id": gpt2_vocab - 1}
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  # "format: pt" is the metadata transformers' from_pretrained expects of a safetensors file.
  safetensors.numpy.save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
  (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2))


def merge_pretrained(params: Mapping[str, Any], pretrained: Mapping[str, Any],
                     at: str | Sequence[str] = ()) -> tuple[Any, list[str]]:
  """Overwrites the leaves of `params` under the sub-path `at` ('a/b' or a sequence of keys;
  empty: the root) with the `pretrained` Transformer leaves (e.g. a VAE's params with the
  decoder at 'decoder/transformer'), keeping each target's dtype.

  Returns the new tree (`params` is not modified) and the '/'-joined paths of every leaf left at
  its initial value (e.g. fusion factors, posterior networks), which are also logged. A
  pretrained leaf without a target, or with another shape, is a ValueError naming them all.
  """
  prefix = tuple(at.split("/")) if isinstance(at, str) else tuple(at)
  prefix = tuple(key for key in prefix if key)
  flat = traverse_util.flatten_dict(frozen_dict.unfreeze(params))
  source = traverse_util.flatten_dict(frozen_dict.unfreeze(pretrained))
  name = lambda path: "/".join(path)
  missing = sorted(name(prefix + p) for p in source if prefix + p not in flat)
  mis_shaped = sorted(f"{name(prefix + p)}: {np.shape(flat[prefix + p])} vs pretrained "
                      f"{np.shape(v)}" for p, v in source.items()
                      if prefix + p in flat and np.shape(flat[prefix + p]) != np.shape(v))
  if missing or mis_shaped:
    raise ValueError("cannot merge the pretrained parameters: "
                     + "; ".join(f"{label}: {', '.join(items)}" for label, items in
                                 (("no such parameter", missing), ("wrong shape", mis_shaped))
                                 if items))
  for path, value in source.items():
    flat[prefix + path] = jnp.asarray(value, jnp.result_type(flat[prefix + path]))
  left = sorted(name(p) for p in flat if p[:len(prefix)] != prefix or p[len(prefix):] not in source)
  logging.info("merged %d pretrained parameters at '%s'; left at their initial values: %s",
               len(source), name(prefix), ", ".join(left) or "none")
  merged = traverse_util.unflatten_dict(flat)
  if isinstance(params, frozen_dict.FrozenDict):
    merged = frozen_dict.freeze(merged)
  return merged, left
