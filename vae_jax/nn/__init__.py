"""Neural-network layers of vae_jax."""

from vae_jax.nn.lstm import LSTM, lstm_recurrence, uniform_init

__all__ = ["LSTM", "lstm_recurrence", "uniform_init"]
