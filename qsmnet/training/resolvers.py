"""OmegaConf resolvers that let configs name a code default instead of restating its value.

``${qsmnet_default:field_margin_mm}`` in a config is
:data:`qsmnet.transforms.field_support.DEFAULT_FIELD_MARGIN_MM`, the rim ``qsmnet predict``
uses, so a training recipe that imitates ``predict`` follows it when it changes.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM
from qsmnet.transforms.reliability import DEFAULT_MAX_PHASE_STEP_RAD

__all__ = ["CODE_DEFAULTS", "register_resolvers"]

#: The defaults a config may name, by name.
CODE_DEFAULTS = {"field_margin_mm": DEFAULT_FIELD_MARGIN_MM,
                 "max_phase_step_rad": DEFAULT_MAX_PHASE_STEP_RAD}


def _default(name: str):
    if name not in CODE_DEFAULTS:
        raise KeyError(f"qsmnet_default: unknown name {name!r}; known: {sorted(CODE_DEFAULTS)}")
    return CODE_DEFAULTS[name]


def register_resolvers() -> None:
    """Register ``qsmnet_default`` (idempotent)."""
    if not OmegaConf.has_resolver("qsmnet_default"):
        OmegaConf.register_new_resolver("qsmnet_default", _default)
