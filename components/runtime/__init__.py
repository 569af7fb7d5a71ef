"""ONNX models as production runs them: onnxruntime sessions, variant files, bundles, registry loading.

Imports onnxruntime, numpy and Pillow (and MLflow to read the registry); never torch. Every stage that checks
an ONNX file and every consumer load through here, so they see the same pixels and the same provider choice."""
