"""What a whole pipeline run tells people: the summary (terminal, JSON, Prefect) and the parent MLflow run."""
