"""load_weights and model_state_dict across every wrapping: DDP, DataParallel, torch.compile (whole, around or
inside DDP, per block) and AveragedModel of each, on the saving side and on the loading side."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel

from ddp_kit.checkpoint import CheckpointError, save_atomic
from ddp_kit.weights import load_weights, model_state_dict, unwrap_model


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """DDP needs a process group: a single-process gloo group is enough to build the wrapper."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Plain(nn.Module):
    COMPILED_CHILD = "body"

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
        self.head = nn.Linear(6, 3)


class WithModuleAndModelChildren(nn.Module):
    """Real submodules named like the wrappers' attributes: their names must survive."""

    COMPILED_CHILD = "module"

    def __init__(self):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.model = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)


class OnlyModuleChild(nn.Module):
    """Every key starts with a real `module.`: indistinguishable from a DDP prefix without the target."""

    COMPILED_CHILD = "module"

    def __init__(self):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))


class OwnWeightAndModuleChild(nn.Module):
    """`weight` and `module.weight` both exist: stripping one `module.` from a DDP checkpoint matches one key
    wrongly; only the full match is right."""

    COMPILED_CHILD = "module"

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))
        self.module = nn.Linear(6, 6)


MODELS = [Plain, WithModuleAndModelChildren, OnlyModuleChild, OwnWeightAndModuleChild]


def compiled(model: nn.Module) -> nn.Module:
    # The eager backend wraps the same way as inductor (the `_orig_mod` prefix) and compiles nothing until run.
    return torch.compile(model, backend="eager")


def compile_one_block(model: nn.Module) -> nn.Module:
    setattr(model, model.COMPILED_CHILD, compiled(getattr(model, model.COMPILED_CHILD)))
    return model


BASE_WRAPPINGS = {
    "bare": lambda m: m,
    "ddp": DDP,
    "data_parallel": nn.DataParallel,
    "compiled": compiled,
    "compiled_ddp": lambda m: compiled(DDP(m)),
    "ddp_of_compiled": lambda m: DDP(compiled(m)),
    "per_block_compiled": compile_one_block,
}
WRAPPINGS = {**BASE_WRAPPINGS, **{f"averaged_{name}": (lambda wrap: lambda m: AveragedModel(wrap(m)))(wrap)
                                  for name, wrap in BASE_WRAPPINGS.items()}}


def randomize(model: nn.Module) -> None:
    """Give the (averaged, if any) weights fresh random values, so a load is visible in every tensor."""
    with torch.no_grad():
        for value in model_state_dict(model).values():
            value.copy_(torch.randint_like(value, 1000) if not value.is_floating_point() else torch.randn_like(value))


@pytest.fixture(scope="module")
def targets(process_group):
    """Targets for each model class and wrapping, built once: every load overwrites all of a target's weights.
    Released before the process group their DDP wrappers use."""
    built: dict[type, dict[str, nn.Module]] = {}

    def for_class(model_class: type) -> dict[str, nn.Module]:
        if model_class not in built:
            built[model_class] = {name: wrap(model_class()) for name, wrap in WRAPPINGS.items()}
        return built[model_class]

    yield for_class
    built.clear()


@pytest.mark.parametrize("saved_as", ["model_state_dict", "raw_state_dict"])
@pytest.mark.parametrize("source_wrapping", list(WRAPPINGS))
@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_weights_load_across_every_wrapping(targets, model_class, source_wrapping, saved_as):
    source = WRAPPINGS[source_wrapping](model_class())
    randomize(source)
    expected = {k: v.clone() for k, v in model_state_dict(source).items()}
    checkpoint = model_state_dict(source) if saved_as == "model_state_dict" else source.state_dict()
    # Canonical keys are the bare model's own names: plain load_state_dict takes them.
    model_class().load_state_dict(expected)

    for target_wrapping, target in targets(model_class).items():
        report = load_weights(target, checkpoint)
        assert report.complete, f"{source_wrapping} -> {target_wrapping}: {report}"
        loaded = model_state_dict(target)
        assert loaded.keys() == expected.keys()
        mismatched = [k for k in expected if not torch.equal(loaded[k], expected[k])]
        assert not mismatched, f"{source_wrapping} -> {target_wrapping}: differ {mismatched}"


def test_unwrap_model_strips_every_wrapper_in_any_order():
    model = Plain()
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(compiled(DDP(model)))) is model
    assert unwrap_model(compiled(DDP(compiled(model)))) is model
    # AveragedModel: its averaged copy (not the model it was copied from), whatever wraps the two.
    averaged = AveragedModel(DDP(model))
    assert unwrap_model(compiled(averaged)) is unwrap_model(averaged.module) is not model


def test_canonical_keys_keep_real_module_names():
    model = compile_one_block(WithModuleAndModelChildren())
    wrapped = AveragedModel(compiled(DDP(model)))
    assert list(wrapped.state_dict())[:2] == ["n_averaged", "module._orig_mod.module.module._orig_mod.0.weight"]
    assert list(model_state_dict(wrapped))[:3] == ["module.0.weight", "module.0.bias", "module.1.weight"]
    assert "n_averaged" not in model_state_dict(wrapped)


def test_averaged_target_keeps_its_n_averaged():
    target = AveragedModel(Plain())
    target.update_parameters(target.module)
    source = Plain()
    randomize(source)
    report = load_weights(target, DDP(source).state_dict())
    assert int(target.n_averaged) == 1 and report.renamed["module.stem.weight"] == "stem.weight"
    assert torch.equal(target.module.stem.weight, source.stem.weight)


def test_raw_averaged_model_bookkeeping_is_ignored_not_unexpected():
    report = load_weights(Plain(), AveragedModel(DDP(Plain())).state_dict())
    assert report.complete and report.ignored == ["n_averaged"]


def test_default_inductor_compile_wrapper():
    # Only the wrapper is exercised: nothing runs, so inductor compiles nothing.
    source = torch.compile(Plain())
    randomize(source)
    target = torch.compile(Plain())
    load_weights(target, source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))
    bare = Plain()
    load_weights(bare, model_state_dict(target))
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), source.parameters()))


def test_load_from_a_file_and_from_common_containers(tmp_path):
    source, swa = Plain(), Plain()
    randomize(source)
    randomize(swa)
    full = {"model": model_state_dict(source), "swa_model": model_state_dict(swa), "optimizer": {"state": {}}}
    save_atomic(full, tmp_path / "ckpt.pt")
    for checkpoint, key, expected in [
        (tmp_path / "ckpt.pt", None, source),
        (str(tmp_path / "ckpt.pt"), "swa_model", swa),
        ({"state_dict": DDP(source).state_dict(), "epoch": 3}, None, source),
        ({"model_state_dict": source.state_dict()}, None, source),
        ({"ema": AveragedModel(swa).state_dict()}, None, swa),
        ({"model": None, "swa": model_state_dict(swa)}, None, swa),
    ]:
        target = Plain()
        load_weights(target, checkpoint, key=key)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"has no 'swa_model' weights \('swa_model' is None\)"):
        load_weights(Plain(), {"model": model_state_dict(source), "swa_model": None}, key="swa_model")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(Plain(), {"optimizer": {"state": {}}, "epoch": 1})


def test_strict_mismatch_raises_a_readable_error_and_leaves_the_model_unchanged():
    target = Plain()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    checkpoint = {f"module.{k}": v for k, v in Plain().state_dict().items()}
    checkpoint["module.head.weight"] = torch.zeros(5, 6)
    del checkpoint["module.stem.bias"]
    checkpoint.update({f"module.extra{i}.weight": torch.zeros(1) for i in range(12)})
    with pytest.raises(CheckpointError) as raised:
        load_weights(target, checkpoint)
    message = str(raised.value)
    assert "missing 1 (in the model, not in the checkpoint): 'stem.bias'" in message
    assert "unexpected 12 (in the checkpoint, not in the model)" in message and "... and 2 more" in message
    assert "shape mismatched 1: 'head.weight' checkpoint (5, 6) vs model (3, 6)" in message
    assert "left unchanged" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_non_strict_loads_what_matches_and_reports_the_rest():
    target, source = Plain(), Plain()
    randomize(source)
    checkpoint = dict(DDP(source).state_dict())
    checkpoint["module.head.weight"] = torch.zeros(5, 6)
    report = load_weights(target, checkpoint, strict=False)
    assert report.shape_mismatched == {"head.weight": ((5, 6), (3, 6))} and not report.missing
    assert torch.equal(target.stem.weight, source.stem.weight)
    assert not torch.equal(target.head.weight, source.head.weight)
    assert "loaded" in str(report) and "renamed" in str(report)
