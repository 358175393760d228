"""DoSSR domain-shift SDE super-resolution (plain torch/diffusers, no ComfyUI)."""
