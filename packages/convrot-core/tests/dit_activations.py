"""Synthetic activations with the two kinds of outliers found in Diffusion Transformers.

x[t, c] = offset[t] + noise[t, c] * gain[c]

- noise: the well-behaved bulk, standard Gaussian.
- per-token offset (``offset_std``): AdaLN's shift moves every channel of a
  token by the same amount, so each row carries a constant that varies from
  token to token. A Sylvester rotation gathers this constant into one channel
  per group (a huge outlier); a regular one leaves it spread evenly.
- channel outliers (``outlier_channels``, ``outlier_gain``): a few fixed
  channels are far larger than the rest in every token. Any Hadamard rotation
  spreads each over its group; without rotation they set every token's scale.
"""

import torch


def dit_like_activations(
    tokens: int,
    channels: int,
    *,
    offset_std: float = 5.0,
    outlier_channels: int = 16,
    outlier_gain: float = 50.0,
    seed: int = 0,
) -> torch.Tensor:
    """float64 [tokens, channels], reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tokens, channels, generator=generator, dtype=torch.float64)
    offset = offset_std * torch.randn(tokens, 1, generator=generator, dtype=torch.float64)
    gain = torch.ones(channels, dtype=torch.float64)
    gain[torch.randperm(channels, generator=generator)[:outlier_channels]] = outlier_gain
    return offset + noise * gain
