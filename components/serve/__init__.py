"""`graft serve`: the HTTP service for a registered model (onnxruntime, numpy, Pillow; no torch)."""
