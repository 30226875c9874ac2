r"""Train-step throughput of the LSTM VAE with `vae_jax.nn.LSTM` against plain-scan LSTMs.

The measured step is a whole training step of the reference LSTM VAE (He et al. 2019 sizes):
embedding -> encoder LSTM (final state) -> Gaussian head -> z -> decoder LSTM (initial state
from z, z concatenated to every input) -> softmax over the vocabulary -> NLL + KL -> gradients ->
Adam update. Only the LSTM implementation differs between variants:

  flax_rnn       flax `nn.RNN(nn.OptimizedLSTMCell)`, z concatenated to the T inputs (reference)
  naive_scan     a plain `lax.scan` LSTM cell (both matmuls in the loop), autodiff
  hoisted        hoisted x/z projections, autodiff through the scan (no custom VJP)
  ours           `vae_jax.nn.LSTM`: hoisted projections + custom-VJP recurrence
  ours_u{k}      the same with `unroll=k`
  no_lstm        both LSTMs replaced by a per-step Dense: the cost of everything else

Besides the whole train step, each LSTM variant's layer is also timed alone (forward + backward
of a decoder-like layer with static z and an initial state), which shows the layer's own
speed-up undiluted by the softmax, embeddings and optimiser.

A variant name may end in `@PRESET` to compile that variant's step with per-executable XLA
options (`jax.jit(f).lower(...).compile(compiler_options=...)`, the per-executable form of
`XLA_FLAGS`), e.g. `ours@no_ynn_reduce`; see COMPILER_PRESETS.

Variants are compiled once each (compile time reported separately) and timed interleaved in one
process; the JSON reports tokens/s (token positions per second, B*T per step), the model FLOP
rate (benchmarks.common.lstm_vae_flops_per_token), its fraction of the measured fp32 matmul
ceiling, and the speed-up of every variant over the reference.

  python benchmarks/lstm_layer.py --sizes=ptb --output=runs/bench/lstm_layer_ptb.json
  python benchmarks/lstm_layer.py --sizes=yahoo --variants=flax_rnn,ours \
      --output=runs/bench/lstm_layer_yahoo.json

One size per run keeps a run short: the PTB size takes about a minute, the Yahoo size (a few
seconds per train step on 2 CPU cores) one to three minutes depending on the machine's load.
On a shared machine compare the `speedup_vs_reference` ratios (and their CPU-time
counterparts, which other processes disturb less) rather than absolute rates.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

try:  # `python -m benchmarks.lstm_layer` from the repository root.
  from benchmarks import common
except ImportError:  # `python benchmarks/lstm_layer.py`.
  import common  # type: ignore[no-redef]

from vae_jax.nn import lstm as lstm_lib

# Per-executable XLA:CPU options compared by the benchmark. `no_ynn_reduce` keeps YNNPACK for
# matmuls but leaves reductions to XLA's own emitter: XLA:CPU's default YNNPACK reduction is
# pathologically slow for sums over a leading axis, e.g. the softmax bias gradient
# (sum over B*T rows of [B*T, V] logits gradients). The same setting process-wide:
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce
COMPILER_PRESETS = {
    "default": {},
    "no_ynn_reduce": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "no_ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
}

DEFAULT_REPEATS = {"ptb": 7, "yahoo": 3}
CEILING = "_matmul_ceiling"
CEILING_N = 2048

SIZES = {
    # PTB reference (He et al. 2019): 10k vocabulary, ~22 tokens per sentence.
    "ptb": dict(batch=32, steps=22, embed=256, hidden=256, vocab=10_000, latent=32),
    # Yahoo Answers: 20k vocabulary, ~80 tokens per document.
    "yahoo": dict(batch=32, steps=80, embed=512, hidden=1024, vocab=20_000, latent=32),
}


# ---------------------------------------------------------------------------------------------
# LSTM variants. Each maps (inputs [B,T,D], mask [B,T], initial_state, static [B,Dz] or None)
# to (outputs [B,T,H], (c_T, h_T)) with the masking semantics of vae_jax.nn.LSTM.
# ---------------------------------------------------------------------------------------------


class FlaxRNN(nn.Module):
  """flax `nn.RNN(nn.OptimizedLSTMCell)`; static inputs concatenated to every step."""
  features: int

  @nn.compact
  def __call__(self, inputs, mask, initial_state=None, static_inputs=None):
    if static_inputs is not None:
      z = jnp.broadcast_to(static_inputs[:, None, :],
                           inputs.shape[:2] + static_inputs.shape[-1:])
      inputs = jnp.concatenate([inputs, z], axis=-1)
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    carry, outputs = nn.RNN(nn.OptimizedLSTMCell(self.features), return_carry=True)(
        inputs, initial_carry=initial_state, seq_lengths=lengths)
    return outputs * mask[..., None], carry


class NaiveScanLSTM(nn.Module):
  """The textbook `lax.scan` LSTM: [x_t; z] @ W_ih and h @ W_hh inside the loop, autodiff."""
  features: int

  @nn.compact
  def __call__(self, inputs, mask, initial_state=None, static_inputs=None):
    h = self.features
    if static_inputs is not None:
      z = jnp.broadcast_to(static_inputs[:, None, :],
                           inputs.shape[:2] + static_inputs.shape[-1:])
      inputs = jnp.concatenate([inputs, z], axis=-1)
    w_ih = self.param("kernel_ih", lstm_lib.uniform_init(0.1), (inputs.shape[-1], 4 * h))
    w_hh = self.param("kernel_hh", lstm_lib.uniform_init(0.1), (h, 4 * h))
    b = self.param("bias", nn.initializers.zeros_init(), (4 * h,))
    if initial_state is None:
      initial_state = (jnp.zeros((inputs.shape[0], h)),) * 2

    def body(carry, xs):
      c, hh = carry
      x_t, m_t = xs
      a = x_t @ w_ih + hh @ w_hh + b
      i, f, g, o = jnp.split(a, 4, axis=-1)
      c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
      m = m_t[:, None]
      return (m * c_new + (1 - m) * c, m * h_new + (1 - m) * hh), m * h_new

    final, ys = jax.lax.scan(
        body, initial_state, (jnp.swapaxes(inputs, 0, 1), jnp.swapaxes(mask, 0, 1)))
    return jnp.swapaxes(ys, 0, 1), final


class HoistedAutodiffLSTM(lstm_lib.LSTM):
  """`vae_jax.nn.LSTM` with the custom VJP switched off (autodiff through the same loop)."""

  def __call__(self, inputs, mask, initial_state=None, static_inputs=None):
    # pylint: disable=protected-access
    static_features = None if static_inputs is None else static_inputs.shape[-1]
    w_ih, w_hh, bias, w_z = self._params(inputs.shape[-1], static_features)
    c0, h0 = initial_state or self.initial_state(inputs.shape[0])
    offset = self._offset(bias, w_z, static_inputs)
    offset = offset.T if offset.ndim == 2 else offset[:, None]
    x_proj = lstm_lib._project(jnp.transpose(inputs, (2, 1, 0)), w_ih)
    buffers, (c_t, h_t) = lstm_lib._forward_loop(
        x_proj, offset, jnp.swapaxes(mask, 0, 1), c0.T, h0.T, w_hh, self.unroll,
        save_residuals=False)
    return jnp.transpose(buffers["y"], (2, 1, 0)), (c_t.T, h_t.T)


class NoLSTM(nn.Module):
  """Not an LSTM: a per-step Dense with the LSTM's output shapes. A train step with it in
  place of both LSTMs measures the cost of everything else (embeddings, softmax, Adam)."""
  features: int

  @nn.compact
  def __call__(self, inputs, mask, initial_state=None, static_inputs=None):
    y = nn.Dense(self.features)(inputs) * mask[..., None]
    return y, (y[:, -1], y[:, -1])


def make_lstm(variant: str, features: int) -> nn.Module:
  if variant == "no_lstm":
    return NoLSTM(features)
  if variant == "flax_rnn":
    return FlaxRNN(features)
  if variant == "naive_scan":
    return NaiveScanLSTM(features)
  if variant == "hoisted":
    return HoistedAutodiffLSTM(features)
  if variant == "ours":
    return lstm_lib.LSTM(features)
  if variant.startswith("ours_u"):
    return lstm_lib.LSTM(features, unroll=int(variant[len("ours_u"):]))
  raise ValueError(f"unknown variant {variant!r}")


# ---------------------------------------------------------------------------------------------
# The benchmarked model and train step.
# ---------------------------------------------------------------------------------------------


class BenchVAE(nn.Module):
  """The LSTM VAE of the benchmark (sizes from SIZES), parameterised by the LSTM variant."""
  variant: str
  vocab: int
  embed: int
  hidden: int
  latent: int

  @nn.compact
  def __call__(self, tokens, mask, rng):
    maskf = mask.astype(jnp.float32)
    # Encoder: final state of an LSTM over the sentence.
    enc_x = nn.Embed(self.vocab, self.embed, name="enc_embed")(tokens)
    _, (_, h_last) = make_lstm(self.variant, self.hidden)(enc_x, maskf)
    mean, logvar = jnp.split(nn.Dense(2 * self.latent, name="posterior")(h_last), 2, axis=-1)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    # Decoder: c_0 = W z, h_0 = tanh(c_0), z concatenated to every input.
    inputs = jnp.concatenate([jnp.ones_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    dec_x = nn.Embed(self.vocab, self.embed, name="dec_embed")(inputs)
    c0 = nn.Dense(self.hidden, name="latent_to_cell")(z)
    outputs, _ = make_lstm(self.variant, self.hidden)(
        dec_x, maskf, initial_state=(c0, jnp.tanh(c0)), static_inputs=z)
    logits = nn.Dense(self.vocab, name="output")(outputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    rec = jnp.sum(nll * maskf, axis=1)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - logvar - 1.0, axis=-1)
    return jnp.sum(rec + kl) / jnp.sum(maskf)


def make_train_step(model: BenchVAE, tx: optax.GradientTransformation):

  def train_step(params, opt_state, tokens, mask, rng):
    loss, grads = jax.value_and_grad(model.apply)(params, tokens, mask, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def make_batch(size: dict[str, int], seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, size["vocab"], size=(size["batch"], size["steps"]), dtype=np.int32)
  mask = np.ones_like(tokens, dtype=bool)  # Full-length rows: every position is a real token.
  return jnp.asarray(tokens), jnp.asarray(mask)


def make_layer_step(variant: str, size: dict[str, int]):
  """Forward + backward of one decoder-like LSTM layer alone (static z, initial state).

  Returns (function, args); the function returns the gradients with respect to the layer's
  parameters, inputs, z and initial state of a random linear function of its outputs.
  """
  b, t, e, h, dz = (size[k] for k in ("batch", "steps", "embed", "hidden", "latent"))
  keys = jax.random.split(jax.random.PRNGKey(1), 6)
  x = jax.random.normal(keys[0], (b, t, e))
  z = jax.random.normal(keys[1], (b, dz))
  state = (jax.random.normal(keys[2], (b, h)), jax.random.normal(keys[3], (b, h)))
  w_y = jax.random.normal(keys[4], (b, t, h))
  mask = jnp.ones((b, t), jnp.float32)
  lstm = make_lstm(variant, h)
  params = jax.jit(lstm.init)(keys[5], x, mask, state, z)

  def loss(params, x, z, state):
    y, (c_t, h_t) = lstm.apply(params, x, mask, state, z)
    return jnp.sum(y * w_y) + jnp.sum(c_t) + jnp.sum(h_t)

  return jax.grad(loss, argnums=(0, 1, 2, 3)), (params, x, z, state)


def bench_size(name: str, variants: list[str], repeats: int, warmup: int,
               max_seconds: float, layer: bool = True) -> dict[str, Any]:
  """Times the train step (and the LSTM layer alone) of every variant, interleaved."""
  size = SIZES[name]
  tokens, mask = make_batch(size)
  rng = jax.random.PRNGKey(0)
  tx = optax.adam(1e-3)
  fns = {}
  for variant in variants:
    lstm_variant, _, preset = variant.partition("@")
    options = COMPILER_PRESETS[preset or "default"]
    model = BenchVAE(lstm_variant, size["vocab"], size["embed"], size["hidden"], size["latent"])
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, mask, rng)
    opt_state = tx.init(params)
    fns[("step", variant)] = (make_train_step(model, tx),
                              (params, opt_state, tokens, mask, rng), options)
    if layer and lstm_variant != "no_lstm":
      fns[("layer", variant)] = (*make_layer_step(lstm_variant, size), options)
  # The ceiling matmul is timed in the same rounds, so it sees the same machine load.
  n = CEILING_N
  square = jnp.ones((n, n), jnp.float32)
  fns[("matmul", CEILING)] = (jnp.matmul, (square, square))
  timings = common.time_interleaved(fns, warmup=warmup, repeats=repeats,
                                    max_seconds=max_seconds)
  ceiling_interleaved = 2.0 * n ** 3 / timings.pop(("matmul", CEILING)).median_s / 1e9

  tokens_per_step = size["batch"] * size["steps"]
  step_flops = common.lstm_vae_flops_per_token(size["embed"], size["hidden"], size["vocab"],
                                               size["latent"], size["steps"])
  layer_flops = 3.0 * (common.lstm_flops_per_token(size["embed"], size["hidden"])
                       + 2.0 * size["latent"] * 4 * size["hidden"] / size["steps"])
  ceiling = common.measure_matmul_ceiling()
  result = {
      "size": name, **size,
      "tokens_per_step": tokens_per_step,
      "train_flops_per_token": step_flops,
      "layer_train_flops_per_token": layer_flops,
      "matmul_ceiling_gflops": ceiling,
      "matmul_interleaved_median_gflops": ceiling_interleaved,
      "output_layer_matmul_gflops": common.matmul_gflops(tokens_per_step, size["hidden"],
                                                         size["vocab"], repeats=2),
      "recurrent_step_matmul_gflops": common.matmul_gflops(
          size["batch"], size["hidden"], 4 * size["hidden"], repeats=20),
      "reference": variants[0],
      "train_step": {},
      "layer": {},
  }
  for (kind, variant), timing in timings.items():
    flops = step_flops if kind == "step" else layer_flops
    reference = timings.get((kind, variants[0]))
    tps = tokens_per_step / timing.median_s
    entry = {
        **timing.as_dict(),
        "tokens_per_s": tps,
        "cpu_tokens_per_s": tokens_per_step / timing.cpu_median_s,
        "gflops": tps * flops / 1e9,
        "fraction_of_ceiling": tps * flops / 1e9 / ceiling,
        "fraction_of_interleaved_matmul": tps * flops / 1e9 / ceiling_interleaved,
    }
    if reference is not None:
      entry["speedup_vs_reference"] = reference.median_s / timing.median_s
      entry["cpu_speedup_vs_reference"] = reference.cpu_median_s / timing.cpu_median_s
    result["train_step" if kind == "step" else "layer"][variant] = entry
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="ptb,yahoo")
  parser.add_argument("--variants", default="flax_rnn,naive_scan,ours,no_lstm",
                      help="comma-separated; the first is the reference of the ratios")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed rounds per size (default: 7 at PTB size, 3 at Yahoo size)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--max_seconds", type=float, default=40.0,
                      help="timing budget per size after compilation (at least one round)")
  parser.add_argument("--no_layer", action="store_true",
                      help="time only the train step, not the LSTM layer alone")
  parser.add_argument("--output", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  result = {"benchmark": "lstm_layer", "environment": common.environment(), "sizes": {}}
  for name in args.sizes.split(","):
    repeats = args.repeats or DEFAULT_REPEATS[name]
    result["sizes"][name] = bench_size(name, args.variants.split(","), repeats,
                                       args.warmup, args.max_seconds, not args.no_layer)
  result["wall_s"] = time.perf_counter() - start
  common.write_json(result, args.output)


if __name__ == "__main__":
  main()
