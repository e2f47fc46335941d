"""A configurable 3-D U-Net (the architecture is configuration).

The signature follows MONAI's ``BasicUNet`` idea (``features`` per level, ``norm`` and ``act`` as
a name or a ``(name, kwargs)`` pair) so that depth, width, normalisation and activation
ablations are pure Hydra config; the code is our own.

Each level has two ``3x3x3 conv -> norm -> act`` layers (with optional dropout); the encoder
down-samples with a 2x max-pool, the decoder up-samples with a transposed convolution
(``"deconv"``) or trilinear interpolation followed by a 1x1x1 convolution (``"trilinear"``),
concatenates the skip connection and applies two more conv layers. The output is a 1x1x1
convolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

NormSpec = str | tuple[str, Mapping[str, Any]] | Sequence[Any] | None
ActSpec = str | tuple[str, Mapping[str, Any]] | Sequence[Any] | None

_ACTS = {
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
}


def _split_spec(spec: Any) -> tuple[str | None, dict[str, Any]]:
    """``"name"`` or ``(name, kwargs)`` (a list from YAML works too) -> ``(name, kwargs)``."""
    if spec is None:
        return None, {}
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[0], str):
        return spec[0], dict(spec[1] or {})
    raise ValueError(f"expected a name or a (name, kwargs) pair, got {spec!r}")


def make_act(spec: ActSpec) -> nn.Module:
    """Activation from ``"relu"`` / ``("leakyrelu", {"negative_slope": 0.1})`` / None."""
    name, kwargs = _split_spec(spec)
    if name is None or name.lower() in ("none", "identity"):
        return nn.Identity()
    key = name.lower().replace("_", "")
    if key not in _ACTS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTS)}")
    if key in ("relu", "leakyrelu", "elu", "silu", "mish") and "inplace" not in kwargs:
        kwargs["inplace"] = True
    return _ACTS[key](**kwargs)


def make_norm(spec: NormSpec, channels: int) -> nn.Module:
    """Normalisation layer for ``channels``: instance, batch, group (``num_groups``) or None."""
    name, kwargs = _split_spec(spec)
    if name is None or name.lower() in ("none", "identity"):
        return nn.Identity()
    key = name.lower()
    if key == "instance":
        kwargs.setdefault("affine", True)
        return nn.InstanceNorm3d(channels, **kwargs)
    if key == "batch":
        return nn.BatchNorm3d(channels, **kwargs)
    if key == "group":
        groups = int(kwargs.pop("num_groups", 8))
        groups = max(1, min(groups, channels))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels, **kwargs)
    raise ValueError(f"unknown norm {name!r}; choose from instance, batch, group or None")


class ConvBlock(nn.Sequential):
    """Two ``conv3x3 -> norm -> act (-> dropout)`` layers."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormSpec, act: ActSpec, dropout: float,
                 bias: bool) -> None:
        layers: list[nn.Module] = []
        for i in range(2):
            layers.append(nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=bias))
            layers.append(make_norm(norm, out_ch))
            layers.append(make_act(act))
            if dropout > 0:
                layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Up-sample by 2, concatenate the skip, then a :class:`ConvBlock`."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: NormSpec, act: ActSpec,
                 dropout: float, bias: bool, upsample: str) -> None:
        super().__init__()
        if upsample == "deconv":
            self.up = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2, bias=bias)
        elif upsample == "trilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                nn.Conv3d(in_ch, out_ch, kernel_size=1, bias=bias),
            )
        else:
            raise ValueError(f"upsample must be 'deconv' or 'trilinear', got {upsample!r}")
        self.conv = ConvBlock(out_ch + skip_ch, out_ch, norm, act, dropout, bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet3D(nn.Module):
    """3-D U-Net whose depth, width, norm, activation and up-sampling are arguments.

    Parameters
    ----------
    in_channels, out_channels : int
    features : sequence of int
        Channels per level, shallowest first; ``len(features)`` is the depth (number of levels,
        so ``depth - 1`` poolings). Default ``(16, 32, 64, 128)``.
    norm : ``"instance"`` | ``"batch"`` | ``"group"`` | None, or ``(name, kwargs)``
    act : activation name or ``(name, kwargs)``, e.g. ``("leakyrelu", {"negative_slope": 0.1})``
    dropout : float
        ``Dropout3d`` probability after each conv layer (0 disables).
    upsample : ``"deconv"`` | ``"trilinear"``
    residual : bool
        Add the first ``out_channels`` input channels to the output (xQSM-style residual).
    zero_init_output : bool
        Initialise the output convolution to zero, so that a fresh network outputs exactly 0
        (or exactly its residual input). Gradients still reach the output layer, so it trains.
    bias : bool
        Use biases in the convolutions.

    Spatial sizes must be divisible by :attr:`size_divisor` (``2 ** (depth - 1)``).

    Examples
    --------
    >>> net = UNet3D(3, 1, features=(8, 16), norm=None)
    >>> net(torch.zeros(1, 3, 8, 8, 8)).shape
    torch.Size([1, 1, 8, 8, 8])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1,
                 features: Sequence[int] = (16, 32, 64, 128), norm: NormSpec = "instance",
                 act: ActSpec = ("leakyrelu", {"negative_slope": 0.1}), dropout: float = 0.0,
                 upsample: str = "deconv", residual: bool = False, zero_init_output: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 1 or any(f < 1 for f in features):
            raise ValueError(f"features must be a non-empty sequence of positive ints, got {features}")
        if residual and in_channels < out_channels:
            raise ValueError("residual=True needs in_channels >= out_channels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.features = features
        self.residual = bool(residual)

        self.encoders = nn.ModuleList()
        prev = self.in_channels
        for f in features:
            self.encoders.append(ConvBlock(prev, f, norm, act, dropout, bias))
            prev = f
        self.pool = nn.MaxPool3d(2)
        self.decoders = nn.ModuleList()
        for level in range(len(features) - 2, -1, -1):
            self.decoders.append(UpBlock(features[level + 1], features[level], features[level],
                                         norm, act, dropout, bias, upsample))
        self.head = nn.Conv3d(features[0], self.out_channels, kernel_size=1, bias=True)
        if zero_init_output:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def depth(self) -> int:
        """Number of resolution levels."""
        return len(self.features)

    @property
    def size_divisor(self) -> int:
        """Spatial sizes must be multiples of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        bad = [n for n in x.shape[2:] if n % self.size_divisor]
        if bad:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by "
                             f"{self.size_divisor} (pad the input first)")
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else self.pool(h))
            skips.append(h)
        for dec, skip in zip(self.decoders, reversed(skips[:-1])):
            h = dec(h, skip)
        out = self.head(h)
        if self.residual:
            out = out + x[:, :self.out_channels]
        return out
