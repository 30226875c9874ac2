"""Models: each returns per-example terms (see vae_jax.losses for how they are combined)."""
