"""Plug-in registries (merge methods, post-merge quantizers): a name -> class map with a decorator that registers a
class, and the check of a plug-in's parameters against its ``Params`` dataclass, so every family of plug-ins
refuses a duplicate name, an unknown name and an unknown parameter with the same one-paragraph errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from hdrq_lightning.errors import ConfigError

Plugin = TypeVar("Plugin", bound=type)


class Registry(dict):
    """``{name: class}`` of one plug-in family; ``kind`` names it in errors (e.g. "merge method")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Plugin], Plugin]:
        """Class decorator: register the class under ``name`` (and set its ``name`` attribute)."""

        def register(cls: Plugin) -> Plugin:
            if name in self:
                raise ConfigError(f"{self.kind.capitalize()} '{name}' is registered twice; give the new plug-in "
                                  "another name.")
            cls.name = name
            self[name] = cls
            return cls

        return register

    def build(self, name: str, **params: Any):
        """An instance of the plug-in ``name`` with ``params``."""
        if name not in self:
            raise ConfigError(f"Unknown {self.kind} '{name}'; choose one of {sorted(self)}.")
        return self[name](**params)


def checked_params(params_class: type, params: dict[str, Any], kind: str, name: str):
    """``params_class(**params)``, refusing parameters the dataclass does not have with one paragraph."""
    valid = [field.name for field in dataclasses.fields(params_class)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown parameter(s) {unknown} for {kind} '{name}'; use only its parameters "
                          f"{valid or '(none)'}.")
    return params_class(**params)
