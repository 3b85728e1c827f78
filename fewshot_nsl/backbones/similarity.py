"""Which convolution a backbone's 3×3 layers use: plain, static NSL or dynamic NSL.

Backbones take a ``Similarity`` and ask it for each 3×3 layer, so the same
architecture code builds all five variants and knows nothing of NSL itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fewshot_nsl.errors import UserError
from fewshot_nsl.nsl import DynamicNSLConv2d, StaticNSLConv2d

KINDS = ("conv", "static", "dynamic")
FORMS = ("diagonal", "full")


@dataclass(frozen=True)
class Similarity:
    """``kind`` conv/static/dynamic; ``form`` diagonal/full; ``hidden`` = dynamic meta-network width."""

    kind: str = "conv"
    form: str = "diagonal"
    hidden: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown similarity {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.form not in FORMS:
            raise UserError(f"unknown NSL form {self.form!r}; choose one of {', '.join(FORMS)}")
        if self.hidden < 1:
            raise UserError(f"--nsl-hidden must be >= 1, got {self.hidden}")

    @property
    def label(self) -> str:
        """The leaderboard's ``similarity`` column: conv, static-diagonal, dynamic-full-h64, ...

        Dynamic labels carry the meta-network width, so h=16 and h=64 never share a name.
        """
        if self.kind == "conv":
            return "conv"
        return f"{self.kind}-{self.form}" + (f"-h{self.hidden}" if self.kind == "dynamic" else "")

    def conv3x3(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        """A bias-free 3×3 layer with padding 1 (each is followed by BatchNorm)."""
        if self.kind == "static":
            return StaticNSLConv2d(in_channels, out_channels, 3, stride=stride, padding=1, form=self.form)
        if self.kind == "dynamic":
            return DynamicNSLConv2d(
                in_channels, out_channels, 3, stride=stride, padding=1, form=self.form, hidden=self.hidden
            )
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


PLAIN = Similarity()
