"""MLflow: the tracking store, runs, and the Model Registry's versions, aliases and history (no torch)."""
