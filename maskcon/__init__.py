"""maskcon: MaskCon (Feng & Patras, CVPR 2023) and its baselines for coarse-labelled datasets."""

__version__ = "0.1.0"
