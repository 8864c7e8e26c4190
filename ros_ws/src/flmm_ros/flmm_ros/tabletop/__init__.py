"""The embedded default model's world: generated tabletop scenes and the tiny LLaVA trained on them."""
