"""linearize: convert pretrained Transformer LLMs into hybrid linear + sliding-window attention models.

Library code only; ``python -m linearize.train`` wires the stages with Hydra.
"""

__version__ = "0.1.0"
