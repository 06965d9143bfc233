"""difffeat: pretrained diffusion transformers as feature extractors for multi-label classification."""

__version__ = "0.1.0"
