"""Model specs (timm ViT names + overrides, the paper's presets) and the staged model: divide, hybrid, assemble."""
