"""Loading YAML configuration files into pydantic models with one-line errors.

Each component defines its own pydantic model (cloudside: cloud.yaml, onboard: the node's
params file); this module only turns files and `key:=value` overrides into validated objects.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from avcloud.errors import ConfigError

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data_bytes = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start} is 0x{data_bytes[error.start]:02x}); "
                          "expected YAML") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it contains NUL bytes); expected YAML")
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model_cls: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    """Validate a mapping, turning the first pydantic error into one line naming the field."""
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in first["loc"])
        if not field:  # a check across fields names them itself
            raise ConfigError(f"{source}: {message}") from None
        raise ConfigError(f"{source}: field '{field}': {message}") from None


def load_config(model_cls: type[ModelT], path: str | Path, overrides: dict[str, Any] | None = None) -> ModelT:
    data = read_yaml_mapping(path)
    for dotted_key, value in (overrides or {}).items():
        apply_override(data, dotted_key, value)
    return validate(model_cls, data, str(path))


def check_number(flag: str, value: float, *, above: float | None = None, at_least: float | None = None) -> float:
    """A numeric command-line value: finite (no nan, no inf) and within bounds, else a one-line
    UserError naming the flag."""
    bounds = " > " + f"{above:g}" if above is not None else (" >= " + f"{at_least:g}" if at_least is not None else "")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
            or (above is not None and not value > above) or (at_least is not None and not value >= at_least):
        raise ConfigError(f"{flag} must be a finite number{bounds}, got {value}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a ROS 2 style `-p key:=value` override; the value is read as YAML (so 3, 0.5, true, [a, b])."""
    key, separator, raw_value = text.partition(":=")
    if not separator or not key.strip():
        raise ConfigError(f"parameter override '{text}' must look like key:=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key.strip(), value


def apply_override(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = data
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"parameter override '{dotted_key}': '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value
