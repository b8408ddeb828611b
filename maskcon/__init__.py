"""maskcon: MaskCon (Feng & Patras, CVPR 2023) and its baselines for coarse-labelled datasets."""

__version__ = "0.1.0"


def load_backbone(path, map_location="cpu"):
    """The trained encoder of a run folder or its backbone.pt, with `.metadata` (see maskcon.backbone)."""
    from maskcon.backbone import load_backbone as load

    return load(path, map_location=map_location)
