"""Stage 3, evaluate: metrics, calibration, pictures, the champion gate, and the ONNX held-out check.

`stage.evaluate` scores the trained PyTorch model (torch); `holdout`, `metrics`, `gate` and `calibration`
need numpy and onnxruntime only, so `graft evaluate` runs without the training stack."""
