"""Defaults shared by every experiment config; each config file starts from `base_config()`.

Variants are selected after a colon and may be combined with commas, e.g.
`--config=experiments/configs/vae.py:ptb,anneal`. Any field can be overridden on the command
line, e.g. `--config.model.latent_dim=16`; the KL term by its name and options, e.g.
`--config.kl.kind=free_bits --config.kl.options.target=2 --config.kl.options.per_dimension=True`.
"""

import ml_collections

from vae_jax import kl_terms


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "synthetic"     # a name from vae_jax.data.corpora.CORPORA
  c.data.dir = ""                 # corpus directory (e.g. ../shared/data/ptb); unused for synthetic
  c.data.train_split = "train"
  c.data.valid_split = "valid"
  c.data.test_split = "test"
  c.data.max_vocab_size = 0       # 0: no cap
  c.data.min_count = 1
  c.data.max_length = 100         # tokens incl. EOS; longer sentences follow `overlong`
  c.data.overlong = "truncate"    # 'truncate' | 'drop'
  c.data.batch_size = 32          # global, over all devices and processes
  c.data.eval_batch_size = 64
  c.data.bucket_window = 100      # batches per length-sorting window
  c.data.pad_multiple = 8
  c.data.max_train_examples = 0   # 0: all (a cap for quick runs)
  c.data.exclude = ""             # 'corpus:split' whose sentences are removed from training
  c.data.exclude_dir = ""         # that corpus's directory
  c.data.tokenizer = "word"       # word (a vocabulary of the training words) | gpt2 (BPE)
  c.data.tokenizer_dir = ""       # gpt2: directory with GPT-2's vocab.json and merges.txt

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 256
  c.model.hidden_dim = 256
  c.model.encoder_hidden_dim = 0  # 0: same as hidden_dim
  c.model.latent_dim = 32
  c.model.pooling = "last"
  c.model.dropout_in = 0.0
  c.model.dropout_out = 0.0
  c.model.word_dropout = 0.0
  c.model.share_embedding = False
  c.model.posterior = "gaussian"  # gaussian | flow | kl_preserving (METHODS.md §3)
  c.model.kl_samples = 1          # Monte Carlo samples of a flow posterior's KL
  c.model.latent_to_output = False  # skip connection: z also feeds the output layer
  c.model.smoothness_dropout = 0.0  # amortised regularisation: token dropout rate of x~
  c.model.mean_batch_norm = 0.0   # BN-VAE: fixed gamma of the batch-normalised means; 0: off
  c.model.mean_batch_norm_epsilon = 1e-5  # its normalisation's epsilon (PyTorch's default)
  c.model.pretrained_dir = ""     # Transformers: a GPT-2 checkpoint (HF layout) to start from
  c.model.init = "default"        # LSTM VAE / LM: default | uniform (He et al. 2019: LSTM and
  c.model.init_scale = 0.01       #   dense kernels U(-init_scale, init_scale), embeddings
  c.model.embed_init_scale = 0.1  #   U(-embed_init_scale, embed_init_scale))
  c.model.matmul_dtype = "float32"  # LSTM models: "bfloat16" matmul operands, f32 accumulation
  c.model.flow = ml_collections.ConfigDict()
  c.model.flow.kind = "iaf"       # planar | iaf | coupling
  c.model.flow.num_layers = 4
  c.model.flow.hidden_dim = 64
  c.model.flow.amortized = True   # flow depends on h(x) (must be False for kl_preserving)
  c.model.flow.context_dim = 64
  c.model.flow.max_log_scale = 3.0

  c.kl = ml_collections.ConfigDict()
  c.kl.schedule = "constant"      # constant | linear | sigmoid | cyclical | della_cyclical
  c.kl.value = 1.0                # final (or constant) beta
  c.kl.start = 0.0
  c.kl.warmup_steps = 0           # linear / sigmoid
  c.kl.num_cycles = 4             # cyclical
  c.kl.ratio = 0.5                # cyclical: fraction of a cycle spent rising
  c.kl.cycle_epochs = 2           # della_cyclical: epochs per cycle (official --cycle_iters)
  c.kl.smoothness_weight = 0.0    # lambda of the amortised regulariser (needs smoothness_dropout)
  c.kl.kind = "kl"                # the KL term, a name of vae_jax.kl_terms.KL_TERMS: kl |
                                  # free_bits | free_bits_sentence | density_gap | layer_hinge
  c.kl.options = kl_options()     # the chosen term's options (`set_kl_term`); the others stay
                                  # at their defaults

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"       # adam | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.grad_clip_norm = 5.0
  c.optimizer.plateau_patience = 0   # evaluations without improvement before lr *= factor; 0: off
  c.optimizer.plateau_factor = 0.5
  c.optimizer.plateau_min_epochs = 0.0  # no decay before this many epochs (He et al.: 16)
  c.optimizer.max_decays = 0         # stop after this many decays; 0: never

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.num_epochs = 10.0       # used when num_steps == 0
  c.train.num_steps = 0
  c.train.log_every = 100
  c.train.eval_every = 0          # 0: once per epoch
  c.train.checkpoint_every = 0    # 0: at every evaluation
  c.train.best_metric = ""       # lower is better; "": nll (LM) or neg_elbo (VAE)
  c.train.progress_bar = True
  c.train.aggressive = False      # aggressive inference-network training (He et al. 2019)
  c.train.reload_best_on_decay = False  # a plateau decay continues from the best checkpoint's
                                        # parameters (He et al. 2019's text.py)
  c.train.aggressive_max_inner_steps = 100
  c.train.aggressive_check_every = 15
  c.train.aggressive_stop_metric = "mi"  # ends when this validation metric stops rising

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 0            # autoencoder pretraining (beta = 0) steps, then decoder
                                  # reset; -1: as many as the main run; 0: none

  c.eval = ml_collections.ConfigDict()
  c.eval.k_samples = 500          # importance samples for the reported NLL
  c.eval.batch_size = 16          # sentences per IW-NLL batch (global)
  c.eval.chunk_size = 32          # samples decoded at once: memory ~ batch * chunk * T * V
  c.eval.max_examples = 0         # 0: the whole split
  c.eval.splits = "valid,test"    # evaluated with the best checkpoint at the end of training
  c.eval.num_reconstructions = 1000  # first sentences reconstructed greedily, scored by BLEU
  c.eval.num_print = 5            # samples / reconstructions printed
  c.eval.max_decode_length = 40
  c.eval.mi_max_examples = 1000   # flow posteriors: MI on a random subset (cost O(N^2)); 0: all
  c.eval.hole_samples = 10000     # prior samples of the hole estimate KL(p || q_agg)
  c.eval.num_prior_samples = 1000  # decoded prior samples scored by Self-BLEU, Distinct, NLL
  c.eval.num_interpolations = 100  # sentence pairs whose interpolations are decoded and scored
  c.eval.interpolation_steps = 10
  return c


def kl_options() -> ml_collections.ConfigDict:
  """Every KL term's options at their defaults (vae_jax.kl_terms.option_defaults), so that any
  of them can be set on the command line; the config reader passes the chosen term its own:
    free_bits, free_bits_sentence: target (free nats; per sentence, or per dimension with
      per_dimension=True);
    density_gap: samples (M per posterior), chunk (rows per mixture; 0: the whole batch);
    layer_hinge: threshold (per sentence and layer), reduction (sum | mean over layers)."""
  return ml_collections.ConfigDict(kl_terms.option_defaults())


def set_kl_term(c: ml_collections.ConfigDict, kind: str, **options) -> None:
  """Chooses the KL term `kind` with `options`, every other option back at its default."""
  c.kl.kind = kind
  c.kl.options = kl_options()
  for field, value in options.items():
    if field not in kl_terms.option_fields(kind):
      raise ValueError(f"{field!r} is not an option of the KL term {kind!r}")
    c.kl.options[field] = value


def apply_variants(config: ml_collections.ConfigDict, variants: str, table: dict) -> None:
  """Applies comma-separated named variants from `table` (name -> function(config))."""
  for name in filter(None, (v.strip() for v in (variants or "").split(","))):
    if name not in table:
      raise ValueError(f"unknown config variant {name!r}; available: {', '.join(sorted(table))}")
    table[name](config)
