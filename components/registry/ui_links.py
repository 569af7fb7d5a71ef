"""Links into MLflow's own UI, for version descriptions and model cards that MLflow renders.

MLflow 3's UI routes by the URL fragment (`#/models/NAME/versions/V`), so a link that is only a fragment works
on any MLflow server, under any path prefix, without Graft knowing the server's address. Its Markdown
renderers allow fragment and relative links; pictures in a version description are fetched with the UI's
own relative `get-artifact` URL.
"""

from __future__ import annotations

from urllib.parse import quote


def version_page(name: str, version: str) -> str:
    return f"#/models/{quote(name, safe='')}/versions/{version}"


def run_page(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def run_artifact(experiment_id: str, run_id: str, path: str) -> str:
    """The run's Artifacts tab with `path` open in MLflow's viewer (Markdown, HTML, pictures, JSON)."""
    return f"{run_page(experiment_id, run_id)}/artifacts/{quote(path)}"


def logged_model_page(experiment_id: str, model_id: str, tab: str = "") -> str:
    """An MLflow 3 LoggedModel's page (`tab`: '' for its overview, `artifacts` for its files)."""
    return f"#/experiments/{experiment_id}/models/{model_id}" + (f"/{tab}" if tab else "")

