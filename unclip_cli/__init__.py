"""unclip: creative image operations with unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional
Image Generation with CLIP Latents"), on a stack trained from scratch."""

__version__ = "0.1.0"
