"""Weights arrive as their libraries deliver them, from a loopback server standing in for the hosts.

torchvision's files come through torch.hub's downloader (its sha256 prefix checked) into
$TORCH_HOME; timm's through huggingface_hub into $HF_HOME at a revision, sha256 checked.
First use downloads and verifies, later use reads the cache without a request; a corrupt or
cut-off transfer is refused and leaves nothing behind; `choose.download=never`,
HF_HUB_OFFLINE and a dead network each say where to put the file.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torchvision

from components.backbones.weights import TorchHubFile
from components.backbones.zoo import get_spec
from tests.backbones.conftest import files_under, safetensors_file, sha, torch_file

TIMM_NAME = "timm/test_convnext.r160_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- torchvision: torch.hub's downloader into $TORCH_HOME ---------------------------------------


@pytest.fixture
def mobilenet(weights_server, caches):
    """mobilenet_v3_small's architecture whose weights file is served with the sha256 prefix in its name,
    as download.pytorch.org names every torchvision file; the spec's URL points at the loopback server."""
    torch.manual_seed(0)
    content = torch_file(torchvision.models.mobilenet_v3_small().state_dict())
    file_name = f"mobilenet_v3_small-{sha(content)[:8]}.pth"
    url = weights_server.add_file(f"/models/{file_name}", content)
    weights = TorchHubFile(label="torchvision MobileNet_V3_Small_Weights.IMAGENET1K_V1", address=url)
    spec = dataclasses.replace(get_spec("mobilenet_v3_small"), weights=weights)
    return spec, content, file_name, url


def test_torchvision_weights_download_once_verified_then_come_from_the_cache(mobilenet, weights_server, caches):
    spec, content, file_name, url = mobilenet
    assert spec.missing_weights() == f"weights not found: put {file_name} in {caches['torch']} (from {url})"
    assert spec.ensure_weights("auto") is None
    assert spec.weights_path() == caches["torch"] / file_name
    assert spec.weights_path().read_bytes() == content and weights_server.downloads() == 1
    assert spec.build(64)(torch.zeros(1, 3, 64, 64)).shape == (1, 576)

    assert spec.ensure_weights("auto") is None  # the second run reads the cache
    assert weights_server.downloads() == 1
    assert spec.provenance() == {
        "weights.source": "torchvision MobileNet_V3_Small_Weights.IMAGENET1K_V1 from $TORCH_HOME/hub/checkpoints",
        "weights.revision": "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        "weights.url": url,
        "weights.sha256": sha(content),
    }


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
def test_a_corrupt_or_cut_off_torchvision_download_is_refused_and_leaves_nothing(mobilenet, weights_server, caches, fault):
    spec, content, file_name, url = mobilenet
    weights_server.files[f"/models/{file_name}"].fault = fault
    status = spec.ensure_weights("auto")
    assert status.startswith(f"{url} does not match its published checksum")
    assert "refused and removed" in status and f"put {file_name} in {caches['torch']}" in status
    assert files_under(caches["torch"]) == []  # neither the file nor torch.hub's .partial
    assert spec.missing_weights() is not None

    weights_server.files[f"/models/{file_name}"].fault = None  # the next run, on a sound network
    assert spec.ensure_weights("auto") is None and spec.weights_path().read_bytes() == content


def test_without_network_the_download_names_its_url_and_where_to_put_the_file(mobilenet, weights_server, caches):
    spec, _, file_name, url = mobilenet
    weights_server.stop()
    status = spec.ensure_weights("auto")
    assert status.startswith(f"download of {url} failed (URLError")
    assert status.endswith(f"put {file_name} in {caches['torch']} (from {url})") and "nothing was kept" in status
    assert files_under(caches["torch"]) == []


def test_download_never_only_says_where_to_put_the_file(mobilenet, weights_server, caches):
    spec, _, file_name, url = mobilenet
    assert spec.ensure_weights("never") == (
        f"weights not found: put {file_name} in {caches['torch']} (from {url}) (choose.download=never, so nothing is downloaded)"
    )
    assert weights_server.requests == []


def test_the_zoo_fetches_torchvision_files_from_torchvisions_own_urls(caches):
    spec = get_spec("resnet50")
    assert spec.weights.url() == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert spec.weights.hash_prefix() == "0676ba61"
    assert spec.missing_weights() == (
        f"weights not found: put resnet50-0676ba61.pth in {caches['torch']} "
        "(from https://download.pytorch.org/models/resnet50-0676ba61.pth)"
    )


def test_weights_replaced_under_the_same_name_and_size_get_features_and_a_graph_of_their_own(caches, digits_dir, tmp_path):
    """Other weights of the same architecture saved over a torch.hub file keep its name and its size: the cached
    features and exported backbone of the old weights must not answer for the new ones (they once did, and only the
    deploy stage's accuracy check stopped the wrong model)."""
    from components.backbones.export import backbone_onnx_path
    from components.backbones.features import FeatureCache, compute_features

    spec = get_spec("mobilenet_v3_small")
    path = spec.weights_path()
    path.parent.mkdir(parents=True)
    paths = sorted((digits_dir / "7").iterdir())[:4]
    seen = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        path.write_bytes(torch_file(torchvision.models.mobilenet_v3_small().state_dict()))
        cache = FeatureCache(tmp_path / "cache", spec, 32)
        seen[seed] = (path.stat().st_size, cache.get(paths), cache.hits, backbone_onnx_path(tmp_path, spec, 32, 0, 18))
    assert seen[0][0] == seen[1][0]  # the same name and the same size
    assert seen[1][2] == 0 and seen[0][3] != seen[1][3]
    assert not torch.allclose(torch.from_numpy(seen[0][1]), torch.from_numpy(seen[1][1]))
    fresh = compute_features(spec.build(32), spec, paths, 32)  # the weights in the file now
    assert torch.allclose(torch.from_numpy(seen[1][1]), torch.from_numpy(fresh), atol=1e-5)


# --- timm: huggingface_hub into $HF_HOME, at a revision, sha256 checked --------------------------


@pytest.fixture
def hub_model(weights_server, caches):
    """timm's test_convnext with random weights, published on the loopback Hub as timm publishes weights."""
    torch.manual_seed(0)
    net = timm.create_model("test_convnext.r160_in1k", pretrained=False)
    content = safetensors_file(net.state_dict())
    weights_server.add_hub_file("timm/test_convnext.r160_in1k", "model.safetensors", content, COMMIT)
    return net, content


def test_hub_weights_download_at_a_revision_verified_then_come_from_the_cache(hub_model, weights_server, caches, monkeypatch):
    net, content = hub_model
    spec = get_spec(TIMM_NAME)
    assert spec.missing_weights().startswith("weights not found: on a machine with internet run "
                                             "`hf download timm/test_convnext.r160_in1k model.safetensors`")
    assert spec.ensure_weights("auto") is None
    folder = caches["hub"] / "models--timm--test_convnext.r160_in1k"
    assert spec.weights_path() == folder / "snapshots" / COMMIT / "model.safetensors"
    assert spec.weights_path().resolve() == folder / "blobs" / sha(content)
    assert (folder / "refs" / "main").read_text() == COMMIT
    requests = list(weights_server.requests)
    assert weights_server.downloads() == 1

    weights_server.stop()  # later runs need neither the network nor a request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert spec.ensure_weights("auto") is None and weights_server.requests == requests
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net.forward_head(net.eval().forward_features(images), pre_logits=True)
        torch.testing.assert_close(spec.build(64)(images), expected)
    assert spec.provenance() == {
        "weights.source": "Hugging Face Hub timm/test_convnext.r160_in1k (via huggingface_hub into $HF_HOME/hub)",
        "weights.revision": COMMIT,
        "weights.url": f"{weights_server.address}/timm/test_convnext.r160_in1k/resolve/{COMMIT}/model.safetensors",
        "weights.sha256": sha(content),
    }


def test_a_pinned_hub_revision_is_the_one_fetched(hub_model, weights_server, caches):
    _, content = hub_model
    spec = get_spec(f"{TIMM_NAME}@{COMMIT}")
    assert spec.ensure_weights("auto") is None
    assert ("HEAD", f"/timm/test_convnext.r160_in1k/resolve/{COMMIT}/model.safetensors") in weights_server.requests
    assert spec.provenance()["weights.revision"] == COMMIT and spec.provenance()["weights.sha256"] == sha(content)
    other = get_spec(f"{TIMM_NAME}@v2.0")
    assert other.missing_weights() is not None  # another revision is another file
    # the hint keys choose.weights by the candidate's name as written, the one choose.weights is looked up by
    assert f"name the file in choose.weights ({{{TIMM_NAME}@v2.0: /path/to/model.safetensors}})" in other.missing_weights()
    assert "has none of model.safetensors, pytorch_model.bin at revision v2.0" in other.ensure_weights("auto")


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
def test_a_corrupt_or_cut_off_hub_download_is_refused_and_leaves_nothing(hub_model, weights_server, caches, fault):
    _, content = hub_model
    spec = get_spec(TIMM_NAME)
    weights_server.files["timm/test_convnext.r160_in1k/model.safetensors"].fault = fault
    status = spec.ensure_weights("auto")
    url = f"{weights_server.address}/timm/test_convnext.r160_in1k/resolve/main/model.safetensors"
    if fault == "corrupt":
        assert status.startswith(f"{url} does not match its published sha256 (expected {sha(content)}, got ")
        assert "refused and removed" in status
    else:
        assert status.startswith(f"download of {url} failed") and "nothing was kept" in status
    folder = caches["hub"] / "models--timm--test_convnext.r160_in1k"
    assert [p for p in files_under(folder) if p.parent.name != "refs"] == []  # no blob, no link, no .incomplete
    assert spec.missing_weights() is not None


def test_offline_or_never_a_missing_hub_file_gets_the_instruction(hub_model, weights_server, caches, monkeypatch):
    spec = get_spec(TIMM_NAME)
    assert spec.ensure_weights("never").endswith("(choose.download=never, so nothing is downloaded)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = spec.ensure_weights("auto")
    assert status.startswith("weights not found: on a machine with internet run `hf download timm/test_convnext.r160_in1k")
    assert f"into {caches['hub']}" in status and "{timm/test_convnext.r160_in1k: /path/to/model.safetensors}" in status
    assert status.endswith("(HF_HUB_OFFLINE is set, so nothing is downloaded)")
    assert weights_server.requests == []


def test_without_network_a_hub_download_names_its_url(hub_model, weights_server, caches):
    spec = get_spec(TIMM_NAME)
    weights_server.stop()
    status = spec.ensure_weights("auto")
    url = f"{weights_server.address}/timm/test_convnext.r160_in1k/resolve/main/model.safetensors"
    assert status.startswith(f"download of {url} failed") and "hf download" in status
    assert files_under(caches["hub"]) == []


def test_a_missing_file_is_never_answered_from_the_prefect_cache(tiny_params, digits_dir, caches):
    """A download that failed (no network) is tried again on the next run, not replayed from Prefect's cache."""
    from components.data.folders import scan
    from flows.caching import candidate_cache_key

    split = scan(digits_dir)

    def keys(name: str) -> set[str]:
        return {candidate_cache_key(None, {"params": tiny_params, "split": split, "name": name}) for _ in range(2)}

    assert len(keys("resnet50")) == 2  # missing from $TORCH_HOME: a key of its own each time
    assert len(keys("efficientnet_lite0")) == 1  # present: the same inputs give the same key
    assert all(key.startswith("score-timm--test_convnext.r160_in1k-") for key in keys(TIMM_NAME))
