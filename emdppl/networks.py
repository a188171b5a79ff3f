r"""Image denoiser networks: the raw network ``F(x_in, c_noise)`` of an EDM denoiser for images.

:class:`ConvDenoiser` works on flat vectors like every emdppl network (``x_in`` of shape
``(C H W,)``, so it plugs into :class:`emdppl.teachers.DiffusionModel` and
:func:`emdppl.teachers.train_diffusion` unchanged) and reshapes to ``(C, H, W)`` inside: a stack
of residual 3x3 convolution blocks, each conditioned on the noise level by a per-channel scale
and shift computed from Fourier features of ``c_noise`` (FiLM).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from emdppl.base import PRNGKey, as_key

__all__ = ["ConvDenoiser"]


class _ResidualBlock(eqx.Module):
    r"""``h + conv_2(silu(conv_1(silu(GN(h))) (1 + s) + b))`` with ``(s, b)`` a linear map of
    the noise embedding; ``conv_2`` starts at zero, so the block starts as the identity."""

    norm: eqx.nn.GroupNorm
    conv_1: eqx.nn.Conv2d
    conv_2: eqx.nn.Conv2d
    film: eqx.nn.Linear

    def __init__(self, channels: int, embed_dim: int, groups: int, *, key: PRNGKey):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm = eqx.nn.GroupNorm(groups, channels)
        self.conv_1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k1)
        conv_2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k2)
        self.conv_2 = eqx.tree_at(
            lambda c: (c.weight, c.bias),
            conv_2,
            (jnp.zeros_like(conv_2.weight), jnp.zeros_like(conv_2.bias)),
        )
        self.film = eqx.nn.Linear(embed_dim, 2 * channels, key=k3)

    def __call__(self, h: jax.Array, embedding: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.film(embedding), 2)
        u = self.conv_1(jax.nn.silu(self.norm(h)))
        u = u * (1 + scale[:, None, None]) + shift[:, None, None]
        return h + self.conv_2(jax.nn.silu(u))


class ConvDenoiser(eqx.Module):
    r"""Raw EDM network ``F(x_in, c_noise)`` for images of shape ``sample_shape = (C, H, W)``.

    ``x_in`` (shape ``(C H W,)``) is reshaped to ``(C, H, W)``, lifted to ``width`` channels by
    a 3x3 convolution, passed through ``depth`` :class:`_ResidualBlock`\ s conditioned on the
    embedding :math:`e = \mathrm{MLP}([\sin(f_k c_{noise}), \cos(f_k c_{noise})]_k)`,
    :math:`f_k = k`, ``k = 1 .. num_frequencies``, and mapped back to ``C`` channels by a
    3x3 convolution; the output is flattened to ``(C H W,)``. Convolutions are padded, so any
    ``H, W`` work; the receptive field is ``4 depth + 5`` pixels.

    Parameters
    ----------
    sample_shape
        ``(C, H, W)`` of one image.
    key
        PRNG key for the initial weights.
    width
        Channels of the hidden feature maps (a multiple of ``groups``).
    depth
        Number of residual blocks.
    embed_dim, num_frequencies
        Width of the noise embedding and number of Fourier frequencies.
    groups
        Groups of the group normalisation.

    Examples
    --------
    >>> net = emdppl.networks.ConvDenoiser((1, 8, 8), key=jax.random.key(0))
    >>> net(jnp.zeros(64), jnp.asarray(0.1)).shape
    (64,)
    """

    conv_in: eqx.nn.Conv2d
    blocks: tuple[_ResidualBlock, ...]
    conv_out: eqx.nn.Conv2d
    embed: eqx.nn.MLP
    frequencies: jax.Array
    sample_shape: tuple[int, int, int] = eqx.field(static=True)

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        *,
        key: PRNGKey,
        width: int = 32,
        depth: int = 3,
        embed_dim: int = 64,
        num_frequencies: int = 8,
        groups: int = 8,
    ):
        sample_shape = tuple(int(n) for n in sample_shape)
        if len(sample_shape) != 3 or min(sample_shape) < 1:
            raise ValueError(f"sample_shape must be (C, H, W), got {sample_shape}.")
        if width % groups:
            raise ValueError(f"width={width} must be a multiple of groups={groups}.")
        channels = sample_shape[0]
        k_in, k_out, k_embed, k_blocks = jax.random.split(as_key(key), 4)
        self.sample_shape = sample_shape
        self.frequencies = jnp.arange(1, num_frequencies + 1, dtype=jnp.float32)
        self.embed = eqx.nn.MLP(
            2 * num_frequencies, embed_dim, embed_dim, 1, activation=jax.nn.silu, key=k_embed
        )
        self.conv_in = eqx.nn.Conv2d(channels, width, 3, padding=1, key=k_in)
        self.blocks = tuple(
            _ResidualBlock(width, embed_dim, groups, key=k)
            for k in jax.random.split(k_blocks, depth)
        )
        self.conv_out = eqx.nn.Conv2d(width, channels, 3, padding=1, key=k_out)

    def __call__(self, x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
        angles = jax.lax.stop_gradient(self.frequencies) * c_noise
        embedding = jax.nn.silu(self.embed(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])))
        h = self.conv_in(x_in.reshape(self.sample_shape))
        for block in self.blocks:
            h = block(h, embedding)
        return self.conv_out(jax.nn.silu(h)).reshape(x_in.shape)
