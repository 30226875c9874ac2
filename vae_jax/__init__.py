"""vae_jax: sequence VAEs that do not suffer posterior collapse, in JAX/Flax."""

__version__ = "0.1.0"
