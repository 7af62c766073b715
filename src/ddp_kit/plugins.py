"""User code named in a config: "package.module:attribute" import paths for models and objectives.

Resolved before any process group starts, so a typo fails in seconds with a message naming the setting,
not after every rank has started and loaded data.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from .config import ConfigError, did_you_mean


def is_import_path(name: str) -> bool:
    return ":" in name


def import_object(path: str, setting: str) -> Any:
    """The object `path` names ("package.module:attribute", the attribute may be dotted: "pkg.mod:Outer.inner").
    Raises ConfigError naming `setting` for a malformed path, a module that cannot be imported, or a missing
    attribute (with the closest name the module has)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{setting}={path!r}: an import path is written 'package.module:attribute', e.g. "
                          "'my_project.nets:UNet'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError(f"{setting}={path!r}: no module named {exc.name!r}; install the package or run from "
                              "the directory that holds it (it must be importable: python -c 'import "
                              f"{module_name}')") from exc
        raise ConfigError(f"{setting}={path!r}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while being imported
        raise ConfigError(f"{setting}={path!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            names = [n for n in dir(found) if not n.startswith("_")]
            raise ConfigError(f"{setting}={path!r}: {getattr(found, '__name__', module_name)} has no attribute "
                              f"{part!r}; {did_you_mean(part, names)}it has: {', '.join(names[:20])}")
        found = getattr(found, part)
    return found


def check_call(factory: Callable, kwargs: dict, setting: str, what: str) -> None:
    """Refuse `kwargs` that `factory` cannot take, before it is called (it may be costly or collective)."""
    if not callable(factory):
        raise ConfigError(f"{what} is a {type(factory).__name__}, not a class or function to call with {setting}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: the call itself will say
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{setting}={kwargs!r} does not fit {what}{signature}: {exc}") from None
