import pytest
import torch
import yaml

from ddp_kit.config import Config, ConfigError, config_from_dict, load_config, parse_override, save_config, to_dict
from ddp_kit.data.transforms import build_transform


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def demo_ok(tmp_path):
    return ["data.create_if_missing=digits", f"data.path={tmp_path / 'd.h5'}"]


def test_defaults_and_overrides_are_typed(tmp_path):
    cfg = load_config(None, [*demo_ok(tmp_path), "train.epochs=3", "optim.lr=0.05", "amp.enabled=true",
                             "data.mean=[0.1, 0.2, 0.3]", "data.std=[1, 1, 1]", "model.in_channels=3",
                             "optim.grad_clip_norm=null", "data.prefetch_factor=6",
                             "data.sample_transforms=[{RandomResizedCrop: {size: 32, scale: [0.5, 1.0]}}]"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.05 and cfg.amp.enabled is True
    assert cfg.data.std == [1.0, 1.0, 1.0] and isinstance(cfg.data.std[0], float)
    assert cfg.optim.grad_clip_norm is None and cfg.data.prefetch_factor == 6
    assert cfg.data.sample_transforms == [{"RandomResizedCrop": {"size": 32, "scale": [0.5, 1.0]}}]


def test_yaml_file_then_override_wins(tmp_path):
    path = write(tmp_path, f"train:\n  epochs: 7\n  batch_size: 16\ndata:\n  path: {tmp_path / 'd.h5'}\n"
                           "  create_if_missing: digits\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (2, 16)


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "train.epoch" in message and "did you mean 'epochs'" in message


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*did you mean 'optim'"):
        load_config(None, ["optimizer.lr=0.1"])


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train.epochs=two", "train.epochs: expected an integer, got 'two'"),
    ("train.batch_size=1.5", "expected an integer"),
    ("amp.enabled=1", "amp.enabled: expected true or false"),
    ("amp.dtype=fp8", "amp.dtype: 'fp8' is not one of 'bf16', 'fp16'"),
    ("data.shuffle=random", "is not one of 'chunk', 'full', 'none'"),
    ("train.accum_steps=0", "train.accum_steps=0"),
    ("optim.momentum=1.0", "optim.momentum=1.0: must be in [0, 1)"),
    ("data.std=[0.5, 0.5]", "data.std"),
    ("train.resume=/no/such/ckpt.pt", "train.resume='/no/such/ckpt.pt'"),
    ("preemption.signals=[SIGFOO]", "SIGFOO"),
    ("checkpoint.best_metric=accuracy", "checkpoint.best_metric='accuracy'"),
    ("data.prefetch_factor=0", "data.prefetch_factor=0: must be >= 1 (or null"),
    ("data.batch_transforms=[ColorJitter]", "data.batch_transforms[0]: expected a mapping, got 'ColorJitter'"),
])
def test_bad_values_are_refused_with_key_and_value(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*demo_ok(tmp_path), override])
    assert fragment in str(err.value)


def test_missing_data_file_is_an_error_unless_demo(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(ConfigError, match=f"data.path='{missing}': file does not exist"):
        load_config(None, [f"data.path={missing}"])
    load_config(None, [f"data.path={missing}", "data.create_if_missing=digits"])


def test_pitfall_combinations_refused(tmp_path):
    with pytest.raises(ConfigError, match="static_graph"):
        load_config(None, [*demo_ok(tmp_path), "distributed.static_graph=true", "train.accum_steps=2"])
    with pytest.raises(ConfigError, match="bucket_cap_mb"):
        load_config(None, [*demo_ok(tmp_path), "compile.enabled=true", "distributed.bucket_cap_mb=0.1"])
    with pytest.raises(ConfigError, match="swa.start"):
        load_config(None, [*demo_ok(tmp_path), "swa.enabled=true", "swa.start=12", "train.epochs=10"])


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train..epochs=3", "train.epochs=[1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, [*demo_ok(tmp_path), "train.epochs=4", "swa.enabled=true"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg
    assert config_from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text())) == cfg
    assert to_dict(again)["train"]["epochs"] == 4


def test_shipped_configs_parse(tmp_path):
    cfg = load_config("configs/digits.yaml")
    assert isinstance(cfg, Config) and cfg.data.create_if_missing == "digits"
    gpu = load_config("configs/resnet50_bf16_4gpu.yaml", [*demo_ok(tmp_path), "data.val_path=null"])
    assert gpu.amp.dtype == "bf16" and gpu.model.name == "resnet50"
    crop = build_transform(gpu.data.sample_transforms, "data.sample_transforms")
    assert crop(torch.zeros(3, 256, 256, dtype=torch.uint8)).shape == (3, 224, 224)
