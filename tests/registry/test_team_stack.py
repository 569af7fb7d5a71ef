"""The team stack, run for real: `mlflow server` on PostgreSQL with its artifacts in S3 (moto's server mode),
all started and stopped here. The whole flow registers through it, a consumer loads the champion through it,
and two registrations at once both land.

Clients talk to the MLflow server only: it proxies artifact uploads and downloads (`--artifacts-destination`),
so only the server holds S3 credentials.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from components.registry.versions import alias_version
from tests import services
from tests.conftest import REPO, tiny_overrides
from tests.deploy.fixtures import dump_deploy_inputs, tiny_model  # noqa: F401

pytestmark = pytest.mark.slow

BUCKET = "team-mlflow"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """(server URL, database URI, S3 endpoint) of a fresh team stack for the module."""
    if services.postgres_binaries() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    work = tmp_path_factory.mktemp("team-stack")
    with services.postgres_server() as database, services.s3_server(BUCKET) as s3:
        env = {**services.clean_env(), **services.S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}
        with services.team_mlflow_server(database, f"s3://{BUCKET}/mlflow", work, env) as url:
            yield url, database, s3


def _s3_keys(endpoint: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=services.S3_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=services.S3_ENV["AWS_SECRET_ACCESS_KEY"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _versions_in_postgres(database: str, name: str) -> list[int]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(database)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text("select version from model_versions where name = :n order by version"), {"n": name})
            return [row[0] for row in rows]
    finally:
        engine.dispose()


def test_the_whole_flow_registers_through_postgres_and_s3_and_a_consumer_loads_the_champion(
    team, tmp_path, digits_dir, feature_cache_dir, prefect_harness, monkeypatch
):
    from components.runtime.model import OnnxClassifier
    from flows.cli import main
    from mlflow import MlflowClient

    url, database, s3 = team
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)  # the client needs no object-store credentials: the server proxies
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    args = ["run", "--params", str(REPO / "params.yaml"), "--summary", str(tmp_path / "summary.json")]
    for item in [*tiny_overrides(digits_dir, tmp_path, feature_cache_dir, seed_store=False), "deploy.model_name=graft-team",
                 "choose.candidates=[efficientnet_lite0]", "choose.baseline=false"]:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["registered"]["aliases"] == ["champion"]
    assert not (tmp_path / "mlflow").exists()  # nothing went to the local store

    client = MlflowClient(url, url)
    version = client.get_model_version("graft-team", summary["registered"]["version"])
    assert _versions_in_postgres(database, "graft-team") == [int(version.version)]
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert model.source_run_id == summary["run_id"] and model.artifact_location.startswith("mlflow-artifacts:/")
    keys = _s3_keys(s3)
    assert any(k.endswith(f"{model.model_id}/artifacts/model.onnx") for k in keys), keys[:20]
    assert any(k.endswith(f"{summary['run_id']}/artifacts/model_card/model_card.html") for k in keys)

    loaded = OnnxClassifier.load("models:/graft-team@champion")  # through the server's artifact proxy, digests checked
    assert loaded.source.version == version.version and loaded.source.sha256 == version.tags["sha256.model.onnx"]
    assert "**Champion: v1**" in client.get_registered_model("graft-team").description


_DEPLOY = r"""
import json, sys, time
from pathlib import Path
from tests.deploy.fixtures import deploy_dumped

uri, inputs, go, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
print(json.dumps({"version": deploy_dumped(inputs, uri, "graft-team-race", work).version}))
"""


def test_two_registrations_at_once_on_the_team_stack_get_distinct_versions_and_one_champion(team, tiny_model, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    url, database, _ = team
    inputs = dump_deploy_inputs(tiny_model, tmp_path / "inputs.pickle")
    go = tmp_path / "go"
    children = [
        subprocess.Popen([sys.executable, "-c", _DEPLOY, url, str(inputs), str(go), str(tmp_path / f"work{n}")], cwd=REPO,
                         env={**services.clean_env(), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (0, 1)
    ]
    time.sleep(5)
    go.touch()
    versions = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        versions.append(json.loads(out.strip().splitlines()[-1])["version"])
    assert sorted(versions) == ["1", "2"]
    assert _versions_in_postgres(database, "graft-team-race") == [1, 2]
    client = MlflowClient(url, url)
    champion = alias_version(client, "graft-team-race")
    assert champion in versions
    challenger = alias_version(client, "graft-team-race", "challenger")
    assert challenger is None if champion == "2" else challenger == "2"  # the newest version that is not champion
    for version in versions:
        tags = client.get_model_version("graft-team-race", version).tags
        assert {"gate.verdict", "test.accuracy", "data_md5", "sha256.model.onnx"} <= set(tags)
