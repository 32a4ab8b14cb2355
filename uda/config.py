"""YAML presets in MIC's vocabulary, with strict overrides.

A preset is a YAML file in ``uda/configs/`` (or any path). The full recipe,
``cs2acdc.yaml``, defines every key; other presets name it in ``_base_`` and
may only change values, so a typo is an error instead of a silently ignored
knob. ``_base_`` is one string: an absolute path (``~`` works), or a name
looked up first next to the file that names it (as given, then with ``.yaml``
or ``.yml`` appended when it has no suffix), then among the built-in presets
(``cs2acdc`` or ``cs2acdc.yaml``). So a user's ``my.yaml`` anywhere can say
``_base_: cs2acdc``; a local file that names itself (a ``cs2acdc.yaml`` with
``_base_: cs2acdc``) extends the built-in preset of that name. Overrides use
mmsegmentation's ``--cfg-options`` form, ``a.b.c=value``, with values parsed
as YAML (``runner.max_iters=200``, ``model.hr_crop_size=[256,256]``).

Example:
    >>> cfg = load_config("default", ["runner.max_iters=10"])
    >>> cfg["runner"]["max_iters"]
    10
"""

from __future__ import annotations

import copy
import difflib
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from uda.errors import UserError

PRESETS_DIR = Path(__file__).parent / "configs"
BASE_KEY = "_base_"


class ConfigError(UserError, ValueError):
    """A preset or an override that does not fit the recipe's schema."""


def list_presets() -> list[str]:
    """Names of the presets shipped in ``uda/configs/``."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset_path(preset: str | Path) -> Path:
    """Map a preset name (``default``, ``cs2acdc``) or a YAML path to a file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        return path
    candidate = PRESETS_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"Unknown preset {str(preset)!r}. Available presets: {', '.join(list_presets())}; "
            "or pass the path of a YAML file."
        )
    return candidate


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping at the top level, got {type(data).__name__}.")
    return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(key: str, base_value: Any, new_value: Any) -> None:
    """Reject a value whose type cannot stand where the base has ``base_value``."""
    if base_value is None or new_value is None:
        return  # null in the base means "optional, any type"; null clears a value
    if isinstance(base_value, bool) or isinstance(new_value, bool):
        ok = isinstance(base_value, bool) and isinstance(new_value, bool)
    elif isinstance(base_value, float):
        ok = isinstance(new_value, (int, float))
    elif isinstance(base_value, int):
        ok = isinstance(new_value, int)
    elif isinstance(base_value, (list, tuple)):
        ok = isinstance(new_value, (list, tuple))
    elif isinstance(base_value, dict):
        ok = isinstance(new_value, dict)
    else:
        ok = isinstance(new_value, type(base_value))
    if not ok:
        raise ConfigError(
            f"{key} expects a {_type_name(base_value)} (like {base_value!r}), got {new_value!r}."
        )


def _unknown_key_error(key: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown config key {key!r}.{hint} Valid keys here: {', '.join(known)}.")


def merge_into(base: dict[str, Any], update: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; every key must exist in ``base``."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in merged:
            raise _unknown_key_error(dotted, merged.keys())
        _check_type(dotted, merged[key], value)
        if isinstance(merged[key], dict) and isinstance(value, Mapping):
            merged[key] = merge_into(merged[key], value, prefix=f"{dotted}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _with_suffixes(path: Path) -> list[Path]:
    """``path`` as given, then with ``.yaml``/``.yml`` when it has no suffix."""
    if path.suffix:
        return [path]
    return [path, path.with_name(path.name + ".yaml"), path.with_name(path.name + ".yml")]


def _resolve_base(base: Any, path: Path) -> Path:
    """Find the file that ``path``'s ``_base_: base`` names (see the module docstring)."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{path}: {BASE_KEY} must be a string naming one base file (a preset name or a YAML "
            f"path), got {base!r}; only one base file is supported."
        )
    try:
        given = Path(base.strip()).expanduser()
    except RuntimeError:  # "~" with no home directory
        raise ConfigError(f"{path}: cannot expand {BASE_KEY} {base!r}: no home directory.") from None
    local = _with_suffixes(given if given.is_absolute() else path.parent / given)
    named_itself = False
    for candidate in local:
        if candidate.is_file():
            if candidate.resolve() == path:
                # "cs2acdc.yaml" saying "_base_: cs2acdc" means the built-in one, not itself.
                named_itself = True
                continue
            return candidate
    # Only a bare name can be a built-in preset; "../x.yaml" or "/x" is a path.
    builtin: list[Path] = []
    if not given.is_absolute() and len(given.parts) == 1:
        builtin = [PRESETS_DIR / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")]
        if builtin[0].is_file():
            return builtin[0]
    if named_itself:
        return path  # no built-in of that name: report it as the circular chain it is
    looked = ", ".join(str(c) for c in (*local, *builtin))
    raise ConfigError(
        f"{path} has {BASE_KEY}: {base}, which was not found. Looked for: {looked}. "
        f"Built-in presets: {', '.join(list_presets())}."
    )


def _load_preset_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"Circular _base_ chain: {' -> '.join(str(p) for p in (*seen, path))}.")
    data = _read_yaml(path)
    base_name = data.pop(BASE_KEY, None)
    if base_name is None:
        return data
    base = _load_preset_file(_resolve_base(base_name, path), (*seen, path))
    try:
        return merge_into(base, data)
    except ConfigError as err:
        raise ConfigError(f"In {path.name}: {err}") from None


def _yaml_number_fix(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict.

    One string is split like a shell command line (``shlex``), so a value with
    spaces is quoted: ``"a.b=1 c='[1, 2]'"``.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        items = [(str(k), v) for k, v in overrides.items()]
    else:
        if isinstance(overrides, str):
            try:
                overrides = shlex.split(overrides)
            except ValueError as err:  # an unclosed quote
                raise ConfigError(
                    f"Overrides {overrides!r}: {err}; quote a value with spaces whole, e.g. c='[1, 2]'."
                ) from None
        items = []
        for text in overrides:
            if not text.strip():
                continue
            if "=" not in text:
                raise ConfigError(f"Override {text!r} must look like key.subkey=value.")
            key, raw = text.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                raise ConfigError(f"Override {text!r}: the value is not valid YAML.") from None
            items.append((key.strip(), _yaml_number_fix(value)))
    nested: dict[str, Any] = {}
    for key, value in items:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"Override key {key!r} has an empty component.")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {key!r} conflicts with another override.")
        node[parts[-1]] = value
    return nested


def load_config(
    preset: str | Path = "default", overrides: Iterable[str] | Mapping[str, Any] | str | None = None
) -> dict[str, Any]:
    """Load a preset, apply overrides, and return the resolved config as a plain dict.

    Args:
        preset: Preset name in ``uda/configs`` or a path to a YAML file.
        overrides: ``key.sub=value`` strings (or a mapping of dotted keys to
            values) applied after the preset. Unknown keys raise ConfigError.

    Returns:
        The resolved nested dict (no ``_base_`` key left).
    """
    cfg = _load_preset_file(resolve_preset_path(preset))
    return merge_into(cfg, parse_overrides(overrides))


def dump_config(cfg: Mapping[str, Any]) -> str:
    """YAML text of a resolved config, in the order it was defined."""
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None)


def get(cfg: Mapping[str, Any], dotted: str) -> Any:
    """Read ``cfg['a']['b']`` as ``get(cfg, 'a.b')``."""
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node
