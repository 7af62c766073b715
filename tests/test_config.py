import pytest
import torch
import yaml

from ddp_kit.config import Config, ConfigError, config_from_dict, load_config, parse_override, save_config, to_dict
from ddp_kit.data.transforms import build_transform
from ddp_kit.data import DataError, prepare_data


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


def test_missing_data_file_is_an_error_before_training_unless_demo(tmp_path):
    # load_config accepts it (a user's script may write the file after reading the config); prepare_data, which
    # train() runs before any process group, refuses it
    missing = tmp_path / "nope.h5"
    with pytest.raises(DataError, match=f"{missing}: .*does not exist"):
        prepare_data(load_config(None, [f"data.path={missing}"]).data)
    prepare_data(load_config(None, [f"data.path={missing}", "data.create_if_missing=digits"]).data)
    assert missing.is_file()


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
    assert cfg.optim.weight_decay == 5e-4  # written 5e-4: a string to YAML 1.1
    gpu = load_config("configs/resnet50_bf16_4gpu.yaml", [*demo_ok(tmp_path), "data.val_path=null"])
    assert gpu.amp.dtype == "bf16" and gpu.model.name == "resnet50"
    crop = build_transform(gpu.data.sample_transforms, "data.sample_transforms")
    assert crop(torch.zeros(3, 256, 256, dtype=torch.uint8)).shape == (3, 224, 224)


def as_file(tmp_path, key, text):
    section, name = key.split(".")
    return load_config(write(tmp_path, f"{section}:\n  {name}: {text}\n"), demo_ok(tmp_path))


def as_override(tmp_path, key, text):
    return load_config(None, [*demo_ok(tmp_path), f"{key}={text}"])


def value(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# The table, and the spellings around it: each is read by the key's type, in a file and as an override.
TYPED = [
    ("optim.lr", "3e-4", 3e-4),
    ("optim.lr", "1e-1", 0.1),
    ("optim.lr", "1E-4", 1e-4),
    ("optim.lr", "+2.5e-3", 2.5e-3),
    ("optim.lr", "'3e-4'", 3e-4),  # a quoted number is still the number a number key asks for
    ("optim.eps", "1.0e8", 1e8),  # YAML 1.1 wants a signed exponent with the dot
    ("amp.init_scale", "1e12", 1e12),
    ("amp.init_scale", "65536", 65536.0),
    ("run.name", "2024", "2024"),
    ("run.name", "on", "on"),
    ("run.name", "yes", "yes"),
    ("run.name", "1e3", "1e3"),
    ("run.name", "0.10", "0.10"),
    ("run.name", "2024-01-05", "2024-01-05"),
    ("run.name", "'007'", "007"),
    ("compile.mode", "'null'", "null"),  # quoted: the text
    ("compile.mode", "null", None),
    ("compile.mode", "~", None),
    ("optim.grad_clip_norm", "null", None),
    ("optim.grad_clip_norm", "1e1", 10.0),
    ("train.epochs", "10.0", 10),
    ("train.epochs", "1e1", 10),
    ("train.max_steps", "2e3", 2000),
    ("train.max_steps", "null", None),
    ("amp.enabled", "on", True),
    ("amp.enabled", "off", False),
    ("amp.enabled", "Yes", True),
    ("amp.enabled", "NO", False),
    ("amp.enabled", "tRuE", True),
    ("amp.enabled", "'false'", False),
    ("data.pin_memory", "off", False),
    ("data.pin_memory", "null", None),
    ("schedule.name", "step", "step"),
    ("optim.betas", "[9e-1, 0.99]", [0.9, 0.99]),
    ("preemption.signals", "[SIGUSR1]", ["SIGUSR1"]),
]


@pytest.mark.parametrize("load", [as_file, as_override])
@pytest.mark.parametrize("key, text, expected", TYPED)
def test_values_are_read_by_the_keys_type(tmp_path, load, key, text, expected):
    got = value(load(tmp_path, key, text), key)
    assert got == expected and type(got) is type(expected)


def test_an_empty_value_in_a_file_is_none(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  grad_clip_norm:\ncompile:\n  mode:\nswa:\n"), demo_ok(tmp_path))
    assert cfg.optim.grad_clip_norm is None and cfg.compile.mode is None and cfg.swa == Config().swa


@pytest.mark.parametrize("load", [as_file, as_override])
@pytest.mark.parametrize("key, text, fragment", [
    ("train.epochs", "10.5", "train.epochs: expected an integer, got '10.5'"),
    ("train.epochs", "on", "train.epochs: expected an integer, got 'on'"),
    ("train.epochs", ".inf", "train.epochs: expected an integer, got '.inf'"),
    ("optim.lr", "abc", "optim.lr: expected a number, got 'abc'"),
    ("optim.lr", "true", "optim.lr: expected a number, got 'true'"),
    ("optim.lr", "inf", "optim.lr: expected a finite number, got 'inf'"),
    ("optim.lr", ".nan", "optim.lr: expected a finite number, got '.nan'"),
    ("optim.lr", "-1e-3", "optim.lr=-0.001: must be > 0"),
    ("amp.enabled", "1", "amp.enabled: expected true or false, got '1'"),
    ("amp.enabled", "enable", "amp.enabled: expected true or false, got 'enable'"),
    ("run.name", "null", "run.name: expected a string, got null"),
    ("run.name", "[a, b]", "run.name: expected a string, got ['a', 'b']"),
    ("amp.dtype", "16", "amp.dtype: '16' is not one of 'bf16', 'fp16'"),
])
def test_wrong_values_are_still_refused(tmp_path, load, key, text, fragment):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, key, text)
    assert fragment in str(err.value)


def test_free_form_entries_get_yaml_values_with_exponent_numbers(tmp_path):
    entry = "[{RandomResizedCrop: {size: 32, scale: [6e-1, 1e0], antialias: on, interpolation: '2e1'}}]"
    key = "data.sample_transforms"
    for cfg in (as_override(tmp_path, key, entry), as_file(tmp_path, key, entry)):
        arguments = cfg.data.sample_transforms[0]["RandomResizedCrop"]
        assert arguments == {"size": 32, "scale": [0.6, 1.0], "antialias": True, "interpolation": "2e1"}
        assert [type(x) for x in arguments["scale"]] == [float, float]


def test_saved_config_with_yaml_lookalikes_reloads_equal(tmp_path):
    cfg = load_config(None, [*demo_ok(tmp_path), "run.name=2024", "compile.mode=1e3", "preemption.requeue_marker=on",
                             "optim.lr=3e-4", "amp.init_scale=1e12", "amp.enabled=on", "data.horizontal_flip=off",
                             "optim.eps=1e-12", "data.sample_transforms=[{Pad: {padding: 2, padding_mode: '1e3'}}]"])
    assert (cfg.run.name, cfg.compile.mode, cfg.preemption.requeue_marker) == ("2024", "1e3", "on")
    save_config(cfg, tmp_path / "saved.yaml")
    text = (tmp_path / "saved.yaml").read_text()
    assert "  enabled: true\n" in text and "  horizontal_flip: false\n" in text
    assert load_config(tmp_path / "saved.yaml") == cfg
    # Another YAML reader (PyYAML's own) gets the same values from the file.
    plain = yaml.safe_load(text)
    assert plain["run"]["name"] == "2024" and plain["data"]["sample_transforms"][0]["Pad"]["padding_mode"] == "1e3"
    assert config_from_dict(plain) == cfg
