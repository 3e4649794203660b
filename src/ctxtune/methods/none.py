"""No adaptation: the model as it is. Trains nothing; a study uses it to evaluate its base (for example a
pretrained language model with and without a written instruction or worked examples in the prompt).

Trainable: 0. The trainer evaluates it without a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctxtune.methods.base import Method, MethodConfig
from ctxtune.methods.registry import register_method


@dataclass(frozen=True)
class NoneConfig(MethodConfig):
    pass


@register_method
class NoAdaptation(Method):
    key = "none"
    config_cls = NoneConfig
    identity = "holds"  # nothing is added to the context: the identity holds trivially

    def expected_num_trainable(self) -> int:
        return 0
