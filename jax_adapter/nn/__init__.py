"""Building blocks shared by every trunk and adapter: layers, resizing, the static geometry, the
deformable-attention sampling core (``msda``) and layer, the Spatial Prior Module, the interaction
parts and the shared ViT layers."""
