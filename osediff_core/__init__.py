"""OSEDiff one-step super-resolution and the DAPE prompt extractor (plain torch/diffusers, no ComfyUI)."""
