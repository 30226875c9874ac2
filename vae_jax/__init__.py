"""vae_jax: sequence VAEs that do not suffer posterior collapse, in JAX/Flax.

The public API a research script imports (`import vae_jax as vj; vj.SeqVAE(...)`); every name
is also reachable in its module (listed in `EXPORTS`). Names resolve on first use, so
`import vae_jax` stays cheap. docs/extending.md shows them at work; docs/design.md maps the
modules.
"""

import importlib

__version__ = "0.1.0"

EXPORTS = {
    # Models: per-example terms, the latent-model protocol (vae_jax.posteriors).
    "vae_jax.models.vae": ("SeqVAE", "VAEConfig", "VAETerms", "LSTMLanguageModel",
                           "encoder_param_mask"),
    "vae_jax.models.cvae": ("CVAE", "CVAEConfig", "CVAETerms"),
    "vae_jax.models.della": ("Della", "DellaConfig", "DellaTerms"),
    "vae_jax.models.transformer_lm": ("TransformerLM",),
    "vae_jax.nn.transformer": ("TransformerConfig",),
    # The latent half: posterior families and priors in latent coordinates.
    "vae_jax.posteriors": ("PosteriorParams", "Posterior", "GaussianPosterior",
                           "FlowPosterior", "Prior", "Family", "POSTERIORS", "LatentModel",
                           "NoLatent"),
    # Building blocks.
    "vae_jax.nn.flows": ("Flow", "FlowConfig", "FLOWS"),
    "vae_jax.nn.encoders": ("LSTMEncoder", "GaussianHead"),
    "vae_jax.nn.decoders": ("LSTMDecoder",),
    # Objectives: pure per-example functions, KL terms, losses the loop takes.
    "vae_jax.losses": ("make_vae_loss", "make_lm_loss", "summarize"),
    "vae_jax.kl_terms": ("KL_TERMS", "KLTerm"),
    "vae_jax.schedules": ("from_name",),
    # Evaluation and decoding.
    "vae_jax.evaluation": ("evaluate",),
    "vae_jax.generation": ("generate", "reconstruct", "sample_prior", "generation_metrics"),
    # Runs: a config read into typed configs, built, run, evaluated, loaded back.
    "vae_jax.configs": ("read",),
    "vae_jax.run_config": ("ExperimentConfig",),
    "vae_jax.build": ("build_model", "build_task"),
    "vae_jax.runner": ("run",),
    "vae_jax.run_evaluation": ("evaluate_workdir", "load_run"),
}

_WHERE = {name: module for module, names in EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name in _WHERE:
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'vae_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
