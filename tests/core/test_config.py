"""params.yaml and --set: typed, strict, and explicit about what is wrong."""


import pytest

from components.core.config import Params, load_params, valid_keys
from components.core.errors import ConfigError
from tests.conftest import REPO


def test_repo_params_file_parses_with_every_section():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.dir == (REPO / "data").resolve()
    assert params.deploy.model_name == "graft-digits"


def test_set_overrides_are_typed():
    params = load_params(REPO / "params.yaml", ["train.lr=0.01", "choose.candidates=[efficientnet_lite0]", "data.image_size=null"])
    assert params.train.lr == 0.01
    assert params.choose.candidates == ("efficientnet_lite0",)
    assert params.data.image_size is None
    assert load_params(REPO / "params.yaml", ["deploy.int8_weight_bits=7"]).deploy.int8_weight_bits == 7
    assert load_params(REPO / "params.yaml").deploy.int8_weight_bits == "auto"


def test_unknown_set_key_lists_valid_keys_and_closest_match():
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", ["train.learning_rate=0.1"])
    message = str(err.value)
    assert "train.learning_rate" in message
    assert "train.lr" in message
    assert all(key in message for key in ("data.dir", "deploy.model_name"))


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epochz'.*Did you mean 'train.epochs'"):
        load_params(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.epochs=many", "train.epochs"), ("data.val_fraction=1.5", "data.val_fraction"), ("choose.score=magic", "choose.score"),
     ("deploy.int8_weight_bits=6", "deploy.int8_weight_bits")],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(REPO / "params.yaml", [override])


def test_a_list_given_without_brackets_is_answered_with_the_bracket_form():
    with pytest.raises(ConfigError, match=r"a list is written in brackets: --set choose\.candidates=\[efficientnet_lite0\]"):
        load_params(REPO / "params.yaml", ["choose.candidates=efficientnet_lite0"])


def test_malformed_set_says_the_expected_form():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(None, ["train.lr"])


def test_a_weights_entry_without_a_space_after_its_colon_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"efficientnet_lite0:/w\.pth has no file: .*write \{name: /path/to/file\.pth\}"):
        load_params(REPO / "params.yaml", ["choose.weights={efficientnet_lite0:/w.pth}"])


def test_relative_paths_are_anchored_at_the_params_file(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("data:\n  dir: images\n")
    assert load_params(path).data.dir == (tmp_path / "images").resolve()
    # a factory file like any other path; `~` is the home folder everywhere (not a folder named "~" here)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    params = load_params(path, ["data.dir=~/images", "choose.weights={efficientnet_lite0: ~/w.pth}",
                                "choose.custom={mine: {factory: 'nets/mine.py:net', weights: ~/mine.pth}}"])
    assert params.data.dir == tmp_path / "home" / "images"
    assert params.choose.weights["efficientnet_lite0"] == tmp_path / "home" / "w.pth"
    assert params.choose.custom["mine"].weights == tmp_path / "home" / "mine.pth"
    assert params.choose.custom["mine"].factory == f"{(tmp_path / 'nets' / 'mine.py').resolve()}:net"


def test_valid_keys_cover_all_sections():
    sections = {key.split(".")[0] for key in valid_keys()}
    assert sections == {"data", "choose", "train", "evaluate", "deploy", "tracking"}


def test_the_pt2_templates_are_the_machines_unless_a_folder_is_named_relative_to_the_params_file(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    assert load_params(REPO / "params.yaml").tracking.pt2_templates == tmp_path / "user-cache" / "graft" / "pt2-templates"
    named = load_params(REPO / "params.yaml", ["tracking.pt2_template_dir=templates"])
    assert named.tracking.pt2_templates == REPO / "templates"
