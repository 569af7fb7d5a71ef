"""timm's backbones as candidates: named as timm names them, described by timm's pretrained config,
loaded through timm's own pretrained-file mechanism, pooled features out, blocks for train.unfreeze,
exported to ONNX with onnxruntime agreeing, scored at their own size when data.image_size is null."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from components.backbones.export import export_backbone
from components.backbones.features import OnnxFeatures, torch_extractor
from components.backbones.unfreeze import select_trainable, set_train_mode, trunk_blocks
from components.backbones.weights import HubFile
from components.backbones.zoo import get_spec, random_twin
from components.choose.candidates import plan_candidates, resolve_spec
from components.choose.ranking import ranking_table
from components.choose.stage import choose_model
from components.core.config import load_params
from components.core.errors import ConfigError, ModelError
from components.data.folders import scan
from tests.conftest import REPO, tiny_overrides


def random_file(tmp_path, model: str, seed: int = 0):
    """A real timm architecture with random weights, saved as timm publishes weights (safetensors)."""
    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False).eval()
    path = tmp_path / f"{model}.safetensors"
    save_file(net.state_dict(), path)
    return net, path


def test_a_timm_spec_is_timms_pretrained_config():
    spec = get_spec("timm/convnext_tiny.fb_in22k")
    assert (spec.family, spec.architecture, spec.input_size, spec.interpolation) == ("timm", "convnext_tiny.fb_in22k", 224, "bicubic")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225) and spec.licence == "apache-2.0"
    assert spec.params_m == pytest.approx(27.82, abs=0.01) and spec.pretrained and not spec.fixed_size
    assert spec.weights == HubFile("timm/convnext_tiny.fb_in22k", ("model.safetensors", "pytorch_model.bin"))
    vit = get_spec("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert vit.fixed_size and vit.mean == (0.5, 0.5, 0.5) and vit.resolve_size(64) == 224
    assert get_spec("timm/resnet50").architecture == "resnet50.a1_in1k"  # timm's default weights for the architecture
    twin = get_spec(random_twin("timm/resnet50.a1_in1k"))
    assert twin.name == "random_timm/resnet50.a1_in1k" and not twin.pretrained and twin.weights is None
    assert get_spec("timm/resnet50.a1_in1k@abc123").weights.pinned == "abc123"


def test_unknown_timm_names_get_the_closest_ones():
    with pytest.raises(ConfigError, match=r"timm has no pre-trained weights named 'convnxt_atto'.*timm/convnext_atto.d2_in1k"):
        get_spec("timm/convnxt_atto")
    with pytest.raises(ConfigError, match=r"'resnet50.a9_in1k'.*Did you mean timm/resnet50.a1_in1k"):
        get_spec("timm/resnet50.a9_in1k")
    with pytest.raises(ConfigError, match=r"or timm/<name> for any of timm's pre-trained weights"):
        get_spec("resnet5")


def test_weights_load_through_timms_file_mechanism_and_give_its_pooled_features(tmp_path):
    net, path = random_file(tmp_path, "test_convnext.r160_in1k")
    spec = get_spec("timm/test_convnext.r160_in1k").with_weights(path)
    backbone = spec.build(64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), net.forward_head(net.forward_features(images), pre_logits=True))
    assert backbone(images).shape == (2, net.num_features)
    assert spec.provenance()["weights.source"] == f"local file {path} (choose.weights)"

    _, other = random_file(tmp_path, "test_vit.r160_in1k")
    with pytest.raises(ModelError, match=r"timm/test_convnext.r160_in1k: .*test_vit.r160_in1k.safetensors.*is it the file for this backbone"):
        get_spec("timm/test_convnext.r160_in1k").with_weights(other).build(64)


def test_unfreeze_follows_timms_own_block_groups(tmp_path):
    convnext = timm.create_model("test_convnext.r160_in1k", pretrained=False, num_classes=0)
    blocks = trunk_blocks(convnext)
    assert len(blocks) == 4  # the four stages; the final norm goes with the last one
    trainable = select_trainable(convnext, 1)
    trains = {name for name, p in convnext.named_parameters() if p.requires_grad}
    assert trains == {name for name, _ in convnext.named_parameters() if name.startswith(("stages.3.", "head.norm."))}
    assert trainable.total_blocks == 5 and trainable.parameters == sum(convnext.get_parameter(n).numel() for n in trains)

    vit = timm.create_model("test_vit.r160_in1k", pretrained=False, num_classes=0)
    assert len(trunk_blocks(vit)) == len(vit.blocks)
    effnet = timm.create_model("test_efficientnet.r160_in1k", pretrained=False, num_classes=0)
    trainable = select_trainable(effnet, 2)
    set_train_mode(effnet, trainable, freeze_bn=True)
    assert not any(m.training for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert effnet.conv_head.weight.requires_grad and not effnet.conv_stem.weight.requires_grad


def test_a_timm_backbone_exports_to_onnx_and_onnxruntime_agrees(tmp_path):
    _, path = random_file(tmp_path, "test_convnext.r160_in1k")
    spec = get_spec("timm/test_convnext.r160_in1k").with_weights(path)
    backbone = spec.build(64)
    onnx_path = export_backbone(backbone, spec, 64, tmp_path / "backbone.onnx", opset=18)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(OnnxFeatures(onnx_path)(images), torch_extractor(backbone, spec)(images), atol=1e-4)


def test_with_image_size_null_each_backbone_is_scored_at_its_own_size(tmp_path, digits_dir, feature_cache_dir):
    _, path = random_file(tmp_path, "test_convnext.r160_in1k")
    overrides = tiny_overrides(digits_dir, tmp_path, feature_cache_dir) + [
        "data.image_size=null", "choose.baseline=false", "choose.latency_runs=3", "choose.sample_size=12", "choose.finalists=1",
        "choose.candidates=[timm/test_convnext.r160_in1k, efficientnet_lite0]",
        f"choose.weights={{timm/test_convnext.r160_in1k: {path}}}",
    ]
    params = load_params(REPO / "params.yaml", overrides)
    assert resolve_spec(params, "timm/test_convnext.r160_in1k").weights_path() == path
    result = choose_model(params, scan(digits_dir))
    rows = {row.name: row for row in result.candidates}
    assert rows["timm/test_convnext.r160_in1k"].status == "ok" and rows["efficientnet_lite0"].status == "ok"
    assert (rows["timm/test_convnext.r160_in1k"].image_size, rows["efficientnet_lite0"].image_size) == (160, 224)
    table = ranking_table([row.to_dict() for row in result.candidates])
    assert table.splitlines()[-1] in {
        "scored at 160px: timm/test_convnext.r160_in1k; 224px: efficientnet_lite0",
        "scored at 224px: efficientnet_lite0; 160px: timm/test_convnext.r160_in1k",
    }
    assert result.image_size == rows[result.chosen].image_size


def test_a_timm_candidate_list_gets_its_random_twin_as_baseline(tiny_params, digits_dir):
    params = tiny_params.model_copy(update={"choose": tiny_params.choose.model_copy(update={"candidates": ("timm/test_convnext.r160_in1k",)})})
    assert plan_candidates(params, scan(digits_dir)) == ("timm/test_convnext.r160_in1k", "random_timm/test_convnext.r160_in1k")
