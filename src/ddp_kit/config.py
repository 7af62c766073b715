"""Typed run configuration: dataclasses loaded from YAML, strict, overridable from the command line.

Every field has a default and a comment saying what it means; `configs/` holds complete examples.
Values are read by the field's type, not by YAML 1.1's guess (`_convert`): `3e-4` is a number for a float
field, `2024` and `on` are text for a string field, `on`/`off` are booleans for a bool field.
Errors are raised as `ConfigError` before any process group starts, and name the file, key and value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .files import atomic_write_text


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message says which and what to do."""


@dataclass
class RunConfig:
    name: str = "run"  # run directory is <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 0  # every rank and DataLoader worker derives its own seed from this one


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo otherwise
    device: Literal["auto", "cuda", "cpu"] = "auto"  # cpu forces CPU/gloo, e.g. to debug on a GPU machine
    timeout_s: float = 600.0  # process-group (collective) timeout; a stuck rank fails after this
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size
    find_unused_parameters: bool = False
    static_graph: bool = False
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm (statistics over the global batch)
    # torch intra-op threads per process; null: OMP_NUM_THREADS if set, else this process's share of the
    # CPUs it may use (affinity mask, SLURM allocation, processes per node). Logged at start-up.
    cpu_threads: Optional[int] = None


@dataclass
class DataConfig:
    # HDF5 file with the training split (and the validation split unless val_path); null when the datasets come
    # from Python (ddp_kit.train(cfg, datasets=(train, val)))
    path: Optional[str] = "data/digits.h5"
    val_path: Optional[str] = None  # separate HDF5 file for validation
    train_group: str = "train"  # group inside the file holding the split; "" for the file root
    val_group: str = "val"
    # the batch's fields: name -> HDF5 dataset in the split's group, all with one row per sample, any dtype and
    # row shape; null: {image: images, label: labels}. Integer fields stored N x 1 x ... x 1 arrive as N values.
    fields: Optional[dict] = None
    # the fields that are images (uint8 -> float, augmentation, normalization on the device; others arrive as
    # stored); null: [image] if there is a field named image, else none
    image_fields: Optional[list[str]] = None
    # a token stream instead of fields: a 1-D integer dataset in the split's group, read as non-overlapping windows
    # of context_length + 1 tokens, yielded as fields input (window[:-1]) and target (window[1:])
    tokens: Optional[str] = None
    context_length: int = 0  # tokens per training sequence (data.tokens only)
    layout: Literal["auto", "NCHW", "NHWC"] = "auto"  # image fields; auto: the dataset's `layout` attribute, else NCHW
    create_if_missing: Optional[Literal["digits"]] = None  # build the demo file when `path` does not exist
    allow_external_storage: bool = False  # permit external links, external storage, virtual datasets
    shuffle: Literal["chunk", "full", "none"] = "chunk"  # chunk: contiguous blocks, shuffled (fast on HDF5)
    block_size: int = 0  # rows per shuffled block; 0: the dataset's chunk length
    shuffle_window: int = 8  # blocks whose rows are shuffled together in chunk mode
    drop_last: bool = False  # drop the ragged tail instead of padding it with repeated samples
    in_memory: bool = False  # load the split into shared RAM once (small datasets)
    num_workers: int = 2
    pin_memory: Optional[bool] = None  # None: on when the device is CUDA
    persistent_workers: bool = True
    # batches each worker prepares ahead; null: 2, or in chunk mode enough to cover one window of blocks
    prefetch_factor: Optional[int] = None
    multiprocessing_context: Optional[Literal["fork", "spawn", "forkserver"]] = None
    # how workers hand batches over: file_descriptor (torch's default; nothing outlives the processes) or
    # file_system (named /dev/shm files: 1.1-1.6x faster for small images, but a job killed as a whole, as
    # SLURM does, can leave its in-flight batches in /dev/shm until reboot; docs/data.md)
    worker_sharing_strategy: Literal["file_descriptor", "file_system"] = "file_descriptor"
    mean: list[float] = field(default_factory=lambda: [0.5])  # normalization, applied on the device
    std: list[float] = field(default_factory=lambda: [0.5])
    random_crop_padding: int = 0  # train augmentation: pad then random crop; 0 disables
    horizontal_flip: bool = False  # train augmentation
    # torchvision.transforms.v2 entries {ClassName: {arguments}} for training images (docs/data.md):
    sample_transforms: list[dict] = field(default_factory=list)  # per image, in the loader workers
    batch_transforms: list[dict] = field(default_factory=list)  # per batch, on the device, before normalizing


@dataclass
class ModelConfig:
    # small_cnn, mlp, any torchvision classification model (e.g. resnet18), or your own as an import path
    # "package.module:Class" (any callable returning an nn.Module), called with `kwargs`
    name: str = "small_cnn"
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the model's constructor
    num_classes: int = 10  # built-in and torchvision models only (yours take theirs in kwargs)
    in_channels: int = 1  # built-in and torchvision models only
    channels_last: bool = False  # memory format for convolutional nets (faster with AMP on GPUs)
    inputs: list[str] = field(default_factory=lambda: ["image"])  # the batch's fields passed to the model, in order


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # peak learning rate, reached after warmup
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    eps: float = 1e-8  # AdamW only
    weight_decay: float = 5e-4  # not applied to biases and normalization weights
    grad_clip_norm: Optional[float] = None  # clip the global gradient norm; None disables


@dataclass
class ScheduleConfig:
    name: Literal["constant", "step", "cosine"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup from warmup_start_factor * lr, in epochs (fractions allowed)
    warmup_start_factor: float = 0.1
    min_lr: float = 0.0  # cosine floor
    step_epochs: int = 30  # step: multiply by gamma every step_epochs
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per process, per micro-step
    val_batch_size: int = 256  # per process
    accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke tests, debugging)
    log_every_steps: int = 20  # optimizer steps between log lines / scalars
    val_every_epochs: int = 1
    resume: str = "auto"  # auto: newest complete checkpoint in the run directory; never; or a checkpoint path
    # Resume even when world size x batch_size x accum_steps differs from the checkpoint's: the interrupted
    # epoch's remaining rows are taken in the new global batch (none dropped or repeated); refused otherwise.
    allow_global_batch_change: bool = False
    on_nonfinite: Literal["skip", "stop"] = "skip"  # what to do with a NaN/Inf loss on any rank
    detect_anomaly: bool = False  # torch.autograd anomaly detection (slow; for debugging)
    cudnn_benchmark: bool = True
    record_sample_ids: bool = False  # append consumed sample ids to <run_dir>/samples/rank<R>.jsonl (resume checks)
    deterministic: bool = False  # torch.use_deterministic_algorithms


@dataclass
class AmpConfig:
    enabled: bool = False
    dtype: Literal["bf16", "fp16"] = "bf16"  # fp16 uses a GradScaler
    init_scale: float = 65536.0  # fp16 only: the GradScaler's first loss scale


@dataclass
class SwaConfig:
    enabled: bool = False
    start: float = 0.75  # first averaged epoch: an epoch index if >= 1, else a fraction of train.epochs
    lr: float = 0.01  # SWALR target learning rate
    anneal_epochs: int = 1
    anneal_strategy: Literal["cos", "linear"] = "cos"
    # training rows whose statistics the SWA model's BatchNorms are recomputed over: the first N of the split
    # in file order (the converters store rows shuffled), whatever the world size; null: the whole split.
    # The recompute makes one pass per BatchNorm (docs/checkpoints.md), so bound it for very deep networks.
    bn_rows: Optional[int] = None


@dataclass
class CompileConfig:
    enabled: bool = False
    mode: Optional[str] = None  # torch.compile mode: default, reduce-overhead, max-autotune
    backend: str = "inductor"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N optimizer steps; 0 disables
    every_epochs: int = 1  # save at the end of every N epochs; 0 disables
    keep_last: int = 3  # periodic checkpoints kept (older ones are deleted after a newer one is complete)
    # also keep the best checkpoint by this metric (train_loss, val_<metric>, swa_val_<metric>; the metrics are
    # the objective's); auto: the objective's own choice (val_acc, max for classification); null disables
    best_metric: Optional[str] = "auto"
    best_mode: Literal["auto", "max", "min"] = "auto"  # auto: the objective's (min for train_loss)


@dataclass
class ObjectiveConfig:
    # the task: its loss and validation metrics (ddp_kit/objectives.py): classification, regression,
    # segmentation, language_model, or your own as an import path "package.module:attribute"
    name: str = "classification"
    kwargs: dict = field(default_factory=dict)  # its arguments, e.g. {label_smoothing: 0.1, top_k: [1, 5]}


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGUSR2", "SIGTERM"])  # checkpoint and stop on these
    requeue_marker: str = "REQUEUE"  # file written in the run directory when a stop asks to be requeued
    term_deadline_s: float = 25.0  # after SIGTERM/SIGINT, end the process if the orderly stop takes longer
    #   (keep it below the launcher's grace period before SIGKILL: torchrun and SLURM's KillWait give 30 s)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    swa: SwaConfig = field(default_factory=SwaConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, strictly.


def did_you_mean(key: str, valid: list[str]) -> str:
    """The hint "did you mean 'X'? " naming the entry of `valid` closest to a mistyped `key`, or ""."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


@dataclass(frozen=True)
class _Scalar:
    """A YAML scalar as `_SourceLoader` reads it: YAML's reading and the text as written (quotes removed).

    The field's type picks which counts (`_convert`): a str field takes `text` ('2024', 'on', '1e3'), number
    and bool fields take `value`, so typed fields get what the user meant whichever YAML spelling they chose."""

    value: Any  # YAML 1.1 (PyYAML) reading, plus exponent floats without a dot; None only for a real null
    text: str


def _plain(value: Any) -> Any:
    """`value` with every scalar replaced by YAML's reading of it: what free-form mappings pass on."""
    if isinstance(value, _Scalar):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value: Any) -> str:
    """A value for an error message, as the user wrote it."""
    return repr(value.text if isinstance(value, _Scalar) else _plain(value))


def _number(value: Any) -> int | float | None:
    """An int or float from a YAML number or a string that Python reads as one ('3e-4', '1E-4'); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            with contextlib.suppress(ValueError):  # not this kind of number: try the next
                return parse(value)
    return None


BOOLEAN_SPELLINGS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    resolved = _plain(value)
    text = value.text if isinstance(value, _Scalar) else resolved
    if origin in (typing.Union, types.UnionType):
        if resolved is None and type(None) in args:  # null, ~ or nothing; a quoted 'null' is the text
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], where)
    if origin is Literal:
        matches = [a for a in args if a == (text if isinstance(a, str) else resolved)]
        if not matches:
            raise ConfigError(f"{where}: {_shown(value)} is not one of {', '.join(map(repr, args))}")
        return matches[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if annotation is dict:
        if not isinstance(resolved, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        return resolved
    if annotation is bool:
        if isinstance(resolved, str) and resolved.lower() in BOOLEAN_SPELLINGS:
            return BOOLEAN_SPELLINGS[resolved.lower()]
        if not isinstance(resolved, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
        return resolved
    if annotation is int:
        number = _number(resolved)
        if isinstance(number, float) and number.is_integer():  # 10.0 and 1e3 are exact integers
            number = int(number)
        if not isinstance(number, int):
            raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")
        return number
    if annotation is float:
        number = _number(resolved)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}")
        try:
            number = float(number)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        # No setting means anything with inf or nan (null already says "none" where a field allows it).
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
        return number
    if annotation is str:
        if resolved is None:
            raise ConfigError(f"{where}: expected a string, got null (YAML reads null, ~ and an empty value "
                              f"as null; quote the value to mean the text)")
        if not isinstance(text, str):
            raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
        return text
    raise TypeError(f"{where}: unsupported config annotation {annotation!r}")


# Keys that no longer exist, with what replaces them: loading one is an error saying where it went.
MOVED_KEYS = {
    "data.images_key": "data.fields, e.g. data.fields: {image: <your images key>, label: labels}",
    "data.labels_key": "data.fields, e.g. data.fields: {image: images, label: <your labels key>}",
}


def _build(cls: type, values: Any, where: str) -> Any:
    if _plain(values) is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {_shown(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if path in MOVED_KEYS:
            raise ConfigError(f"'{path}' has moved: use {MOVED_KEYS[path]}")
        if key not in names:
            raise ConfigError(
                f"unknown key '{path}': {did_you_mean(str(key), names)}valid keys here are: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# YAML: files and overrides are read by one loader whose scalars keep their source text.

# PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: it reads 3e-4, 1e12 and 1.0e5 as
# strings. YAML 1.2 and every paper's learning rate read them as numbers; so do the loader and the dumper here.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class _SourceLoader(yaml.SafeLoader):
    """SafeLoader that reads every scalar as a `_Scalar`; mapping keys stay YAML's reading of them."""

    def construct_object(self, node, deep=False):
        data = super().construct_object(node, deep)
        return _Scalar(data, node.value) if isinstance(node, yaml.ScalarNode) else data

    def construct_mapping(self, node, deep=False):
        return {_plain(key): value for key, value in super().construct_mapping(node, deep).items()}


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_SourceLoader` would read as something else (e.g. '1e3')."""


for _resolving in (_SourceLoader, _Dumper):
    _resolving.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SourceLoader)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if _plain(node.get(part)) is None:  # absent, or a section left empty in the file (`train:`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", <3>): the value is read as YAML by the loader config files go
    through (numbers, true/false, null, lists), its scalars keeping their text for string fields
    (`run.name=2024` is the name '2024'); `key=` is the empty string."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.epochs=3")
    try:
        value = _read_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `key=value` overrides, build and validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source} does not exist; pass the path of a YAML file (see configs/)")
        try:
            tree = _read_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source} is not valid YAML: {exc}") from exc
        if _plain(tree) is None:  # an empty file: the defaults
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {source}: top level must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        cfg = _build(Config, tree, "")
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal Config (booleans as true/false, strings
    that would read as something else quoted), atomically."""
    atomic_write_text(path, yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Value checks: impossible values are refused here, before any process starts talking to another.


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {what}")


def validate(cfg: Config) -> None:
    t, o, d = cfg.train, cfg.optim, cfg.data
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", cfg.run.name,
             "must be a non-empty directory name without '/'")
    _require(cfg.distributed.timeout_s > 0, "distributed.timeout_s", cfg.distributed.timeout_s, "must be > 0")
    _require(bool(cfg.model.inputs) and all(isinstance(name, str) and name for name in cfg.model.inputs),
             "model.inputs", cfg.model.inputs, "must be a non-empty list of field names, e.g. [image]")
    _require(cfg.distributed.cpu_threads is None or cfg.distributed.cpu_threads >= 1, "distributed.cpu_threads",
             cfg.distributed.cpu_threads, "must be >= 1 or null (fit to the CPUs this process may use)")
    _require(cfg.distributed.bucket_cap_mb > 0, "distributed.bucket_cap_mb", cfg.distributed.bucket_cap_mb,
             "must be > 0")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.val_batch_size >= 1, "train.val_batch_size", t.val_batch_size, "must be >= 1")
    _require(t.accum_steps >= 1, "train.accum_steps", t.accum_steps, "must be >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1 or null")
    _require(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "must be >= 1")
    _require(t.val_every_epochs >= 1, "train.val_every_epochs", t.val_every_epochs, "must be >= 1")
    _require(t.resume in ("auto", "never") or Path(t.resume).is_file(), "train.resume", t.resume,
             "must be 'auto', 'never' or the path of an existing checkpoint file")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
             "must be two numbers in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _require(o.grad_clip_norm is None or o.grad_clip_norm > 0, "optim.grad_clip_norm", o.grad_clip_norm,
             "must be > 0 or null")
    s = cfg.schedule
    _require(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, "must be >= 0")
    _require(0 < s.warmup_start_factor <= 1, "schedule.warmup_start_factor", s.warmup_start_factor,
             "must be in (0, 1]")
    _require(0 <= s.min_lr < o.lr, "schedule.min_lr", s.min_lr, f"must be in [0, optim.lr={o.lr})")
    _require(s.step_epochs >= 1, "schedule.step_epochs", s.step_epochs, "must be >= 1")
    _require(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "must be in (0, 1]")
    _require(cfg.model.num_classes >= 2, "model.num_classes", cfg.model.num_classes, "must be >= 2")
    _require(cfg.model.in_channels >= 1, "model.in_channels", cfg.model.in_channels, "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _require(d.prefetch_factor is None or d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor,
             "must be >= 1 (or null: chosen from the shuffle mode)")
    _require(d.block_size >= 0, "data.block_size", d.block_size, "must be >= 0 (0: the chunk length)")
    _require(d.shuffle_window >= 1, "data.shuffle_window", d.shuffle_window, "must be >= 1")
    _require(d.random_crop_padding >= 0, "data.random_crop_padding", d.random_crop_padding, "must be >= 0")
    _require(len(d.mean) in (1, cfg.model.in_channels), "data.mean", d.mean,
             f"needs 1 or model.in_channels={cfg.model.in_channels} values")
    _require(len(d.std) == len(d.mean) and all(x > 0 for x in d.std), "data.std", d.std,
             "needs as many positive values as data.mean")
    _require(d.path is not None or d.val_path is None, "data.val_path", d.val_path, "needs data.path")
    _validate_fields(d)
    _require(cfg.amp.init_scale > 0, "amp.init_scale", cfg.amp.init_scale, "must be > 0")
    w = cfg.swa
    _require(w.start > 0, "swa.start", w.start, "must be > 0 (an epoch index >= 1 or a fraction of train.epochs)")
    _require(w.lr > 0, "swa.lr", w.lr, "must be > 0")
    _require(w.anneal_epochs >= 0, "swa.anneal_epochs", w.anneal_epochs, "must be >= 0")
    _require(w.bn_rows is None or w.bn_rows >= 1, "swa.bn_rows", w.bn_rows, "must be >= 1 or null (every row)")
    if w.enabled:
        _require(swa_start_epoch(w, t.epochs) < t.epochs, "swa.start", w.start,
                 f"starts at epoch {swa_start_epoch(w, t.epochs)}, after the last epoch ({t.epochs - 1})")
    _require(not (cfg.distributed.static_graph and t.accum_steps > 1), "distributed.static_graph", True,
             "cannot be combined with train.accum_steps > 1: DDP's static graph fails when the first iteration runs "
             "under no_sync(); set one of them back")
    _require(not (cfg.compile.enabled and cfg.distributed.bucket_cap_mb < 1), "distributed.bucket_cap_mb",
             cfg.distributed.bucket_cap_mb, "with compile.enabled, tiny buckets split the compiled graph into "
             "many pieces (one per bucket); use >= 1 (default 25)")
    c = cfg.checkpoint
    _require(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "must be >= 0")
    _require(c.every_epochs >= 0, "checkpoint.every_epochs", c.every_epochs, "must be >= 0")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _require(c.best_metric in (None, "auto", "train_loss") or c.best_metric.startswith(("val_", "swa_val_")),
             "checkpoint.best_metric", c.best_metric, "must be auto, null, train_loss, val_<metric> or "
             "swa_val_<metric> (the objective's metrics, e.g. val_acc)")
    for name in cfg.preemption.signals:
        _require(hasattr(signal, name) and name.startswith("SIG"), "preemption.signals", name,
                 "is not a signal name on this system (e.g. SIGUSR2, SIGTERM)")
    _require(cfg.preemption.term_deadline_s > 0, "preemption.term_deadline_s", cfg.preemption.term_deadline_s,
             "must be > 0")
    _require(bool(cfg.preemption.requeue_marker) and "/" not in cfg.preemption.requeue_marker,
             "preemption.requeue_marker", cfg.preemption.requeue_marker, "must be a plain file name")


def _validate_fields(d: DataConfig) -> None:
    if d.fields is not None:
        _require(bool(d.fields) and all(isinstance(name, str) and name and isinstance(key, str) and key
                                        for name, key in d.fields.items()), "data.fields", d.fields,
                 "must map each field name to the HDF5 dataset holding it, e.g. {image: images, label: labels}")
        _require(d.tokens is None, "data.tokens", d.tokens, "cannot be combined with data.fields: a token stream "
                 "makes its own fields (input, target); remove one of them")
    if d.tokens is not None:
        _require(bool(d.tokens), "data.tokens", d.tokens, "must name a 1-D integer dataset in the split's group")
        _require(d.context_length >= 1, "data.context_length", d.context_length,
                 "must be >= 1 with data.tokens (the tokens the model sees per sequence)")
        _require(not d.image_fields, "data.image_fields", d.image_fields, "a token stream has no image fields")
    if d.image_fields is not None:
        _require(all(isinstance(name, str) and name for name in d.image_fields), "data.image_fields",
                 d.image_fields, "must be a list of field names")
        if d.fields is not None:
            unknown = [name for name in d.image_fields if name not in d.fields]
            _require(not unknown, "data.image_fields", d.image_fields,
                     f"names {unknown}, not among data.fields ({', '.join(d.fields)})")


def swa_start_epoch(swa: SwaConfig, epochs: int) -> int:
    """First epoch (0-based) whose end is averaged into the SWA model: `start` itself if >= 1, else that
    fraction of the run (0.75 of 10 epochs: epochs 7, 8, 9 are averaged)."""
    return int(swa.start) if swa.start >= 1 else int(swa.start * epochs)


@dataclass(frozen=True)
class StepCounts:
    """Optimizer steps of a run whose ranks each train on `micro_per_epoch` micro-batches an epoch."""

    micro_per_epoch: int
    per_epoch: int  # the epoch's last accumulation window may be shorter, and still makes a step
    total: int  # over all train.epochs: the learning-rate schedule's length
    final: int  # the step the run ends at: total, or train.max_steps when that comes first


def step_counts(train: TrainConfig, micro_per_epoch: int) -> StepCounts:
    per_epoch = math.ceil(micro_per_epoch / train.accum_steps)
    total = per_epoch * train.epochs
    return StepCounts(micro_per_epoch, per_epoch, total, min(total, train.max_steps or total))
