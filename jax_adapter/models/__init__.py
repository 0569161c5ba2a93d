"""Model families: one file per trunk (``dinov2``) and one per adapter variant (``dinov2_adapter``)."""
