"""lorahub-ray: LoraHub (gradient-free composition of LoRA modules) at cluster scale on Ray."""

__version__ = "0.1.0"
