"""ctxtune: what context-based fine-tuning can and cannot do.

Implements Petrov, Torr and Bibi, "When Do Prompting and Prefix-Tuning Work? A Theory of
Capabilities and Limitations" (ICLR 2024) as software: every context-based method and the
weight-based baselines on one model, the theory as executable checks, the constructions of
Section 3, and the paper's experiments.
"""

__version__ = "0.1.0"
