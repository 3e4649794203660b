"""The paper's theory as executable checks (Section 4, Section 5 cross-layer effects, Appendix B)."""

from ctxtune.theory.attention import (
    AlphaStats,
    CheckResult,
    alpha_stats,
    check_alpha_control,
    check_attention,
    check_layer,
    check_layers,
    check_output,
    check_span,
    check_weights_control,
    decompose,
    tolerance,
)
from ctxtune.theory.capture import LayerAttention, capture_gpt, capture_method

__all__ = [
    "AlphaStats",
    "CheckResult",
    "LayerAttention",
    "alpha_stats",
    "capture_gpt",
    "capture_method",
    "check_alpha_control",
    "check_attention",
    "check_layer",
    "check_layers",
    "check_output",
    "check_span",
    "check_weights_control",
    "decompose",
    "tolerance",
]
