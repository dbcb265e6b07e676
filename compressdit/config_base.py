"""Strict dataclass configs: unknown keys are errors naming the key, values are type-checked."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from compressdit.errors import ConfigError

C = TypeVar("C", bound="StrictConfig")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, StrictConfig):
        return hint.from_dict(value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


@dataclasses.dataclass
class StrictConfig:
    """Base of every config dataclass: ``from_dict`` rejects unknown keys; ``validate`` checks ranges."""

    @classmethod
    def from_dict(cls: type[C], data: Any, where: str | None = None) -> C:
        where = where or cls.__name__
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(fields))}")
        kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        try:
            config = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        """Range checks; subclasses raise :class:`ConfigError` with ``where`` in the message."""

    def require_positive(self, where: str, *keys: str) -> None:
        """A :class:`ConfigError` naming the first of ``keys`` whose value is not > 0."""
        for key in keys:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be positive, got {getattr(self, key)}")

    def require_non_negative(self, where: str, *keys: str) -> None:
        """A :class:`ConfigError` naming the first of ``keys`` whose value is < 0."""
        for key in keys:
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")

    def to_dict(self) -> dict:
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, StrictConfig):
                value = value.to_dict()
            elif isinstance(value, list):
                value = [v.to_dict() if isinstance(v, StrictConfig) else v for v in value]
            out[field.name] = value
        return out
