"""Command-line configs in the ml_collections ``config_flags`` convention.

``--config configs/llama_lora.py[:preset] --config.optim.learning_rate=3e-4``

A config file is a Python file with ``get_config(preset: str = "") -> ConfigDict``; it may
declare its presets in a module-level ``PRESETS`` tuple so that a wrong name lists the right
ones. The convention is implemented here rather than through absl flags so that it works from
any entry point (no global flag state, callable many times) and every mistake is a one-line
``ConfigError`` that names the key and the fix.

Override rules (``--config.KEY=VALUE`` or ``--config.KEY VALUE``; the last one for a key wins):

* Only existing keys can be set; a typo gets the closest valid key.
* The value is parsed by the type of the field: ``bool`` (true/false/yes/no/1/0; a bare
  ``--config.KEY`` means true), ``int``, ``float`` (ints accepted), ``str`` (taken verbatim),
  ``tuple``/``list`` (a Python literal such as ``'(1, 2)'``; a single value makes a
  one-element sequence).
* A field that may be None must be declared with a type:
  ``config_dict.placeholder(int)`` (default None) or ``FieldReference(8, field_type=int)``.
  Such a field accepts ``None`` or a value of its type. A plain ``None`` field has no type and
  cannot be overridden.
* Sections (nested ConfigDicts) are set field by field; a section with a ``mode`` key also takes
  a value, which sets its mode (``--config.plan=auto`` is ``--config.plan.mode=auto``).
* Mapping sections (named in ``MAPPING_SECTIONS``: a dataset's ``columns``, template field ->
  column) map free names to strings: an override may add an entry
  (``--config.data.train.columns.input=input``) or replace the whole mapping with a dict literal
  (``--config.data.train.columns="{'instruction': 'instruction', 'answer': 'output'}"``).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_BUILTIN_TYPES = (bool, int, float, str, tuple, list)
_USAGE = "expected --config PATH[:PRESET] and --config.KEY=VALUE overrides"
MAPPING_SECTIONS = ("columns",)


class ConfigError(ValueError):
    """A bad config file, preset, key or value; the message says which and how to fix it."""


class UnknownConfigKey(ConfigError):
    """A dotted `key` that the config `cfg` does not have; the message names the closest key or the section's keys."""

    def __init__(self, message: str, key: str, cfg: ConfigDict):
        super().__init__(message)
        self.key, self.cfg = key, cfg


def has_key(cfg: ConfigDict, key: str) -> bool:
    """Whether dotted `key` can be set in `cfg` (an entry of a mapping section counts: it is one to add)."""
    try:
        _lookup(cfg, key)
    except UnknownConfigKey:
        return False
    return True


def _config_module(path_text: str):
    """The config file at ``path_text``, run as a module."""
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"config file '{path_text}' not found")
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path.resolve()))}", path)
    if module_spec is None:
        raise ConfigError(f"config file '{path_text}' is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def config_file_presets(path: str | Path) -> tuple[tuple[str, ...], str]:
    """(the presets a config file declares in ``PRESETS``, ``("",)`` if none; what its docstring says first, up to
    the first comma, parenthesis or full stop)."""
    module = _config_module(str(path))
    summary = re.split(r",\s| \(|\.(?:\s|$)", " ".join((module.__doc__ or "").split()), maxsplit=1)[0]
    return tuple(getattr(module, "PRESETS", ("",))), summary


def load_config_file(spec: str) -> ConfigDict:
    """Runs ``get_config`` of the Python file in ``spec`` = ``PATH[:PRESET]``."""
    path_text, _, preset = spec.partition(":")
    module = _config_module(path_text)

    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file '{path_text}' defines no get_config(preset: str = '') function")
    presets = getattr(module, "PRESETS", None)
    if preset and presets is not None and preset not in presets:
        known = ", ".join(repr(p) for p in presets)
        raise ConfigError(f"unknown preset '{preset}' for '{path_text}'; known presets: {known}")
    if inspect.signature(get_config).parameters:
        cfg = get_config(preset)
    elif preset:
        raise ConfigError(f"get_config() of '{path_text}' takes no preset; drop ':{preset}'")
    else:
        cfg = get_config()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"get_config() of '{path_text}' returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


def parse_config(argv: Sequence[str]) -> ConfigDict:
    """Builds the locked config from ``argv`` (without the program name, e.g. ``sys.argv[1:]``)."""
    spec, overrides = _split_argv(list(argv))
    cfg = load_config_file(spec)
    cfg.lock()
    for key, raw in overrides:
        apply_override(cfg, key, raw)
    return cfg


def _split_argv(argv: list[str]) -> tuple[str, list[tuple[str, str | None]]]:
    """Separates ``--config SPEC`` from the ``(key, raw value or None for bare flags)`` overrides."""
    spec, overrides = None, []
    while argv:
        arg = argv.pop(0)
        name, has_value, value = arg.partition("=")
        if not has_value and argv and not argv[0].startswith("--"):
            value, has_value = argv.pop(0), True
        if name == "--config":
            if not has_value:
                raise ConfigError(f"--config needs a value: {_USAGE}")
            if spec is not None:
                raise ConfigError(f"--config given twice ('{spec}' and '{value}'); give one config file")
            spec = value
        elif name.startswith("--config."):
            overrides.append((name.removeprefix("--config."), value if has_value else None))
        else:
            raise ConfigError(f"unexpected argument '{arg}'; {_USAGE}")
    if spec is None:
        raise ConfigError(f"missing --config PATH[:PRESET]; {_USAGE}")
    return spec, overrides


def apply_override(cfg: ConfigDict, key: str, raw: str | None) -> None:
    """Sets ``cfg[key]`` (dotted) from its command-line text; ``raw=None`` is a bare flag (true)."""
    parent, name = _lookup(cfg, key)
    if name in MAPPING_SECTIONS and isinstance(parent.get(name), ConfigDict):
        parent[name] = _parse_mapping(key, raw)
        return
    if name not in parent:  # a new entry of a mapping section (see _lookup)
        if raw is None:
            raise ConfigError(f"config key '{key}' needs a value: --config.{key}=VALUE")
        with parent.unlocked():
            parent[name] = raw
        return
    field = dict(parent.items(preserve_field_references=True))[name]
    if isinstance(field, ConfigDict):
        if "mode" in field and raw is not None:  # a section with a mode takes it as its value: --config.plan=auto
            apply_override(cfg, f"{key}.mode", raw)
            return
        first = next(iter(field.keys()), "KEY")
        raise ConfigError(f"config key '{key}' is a section; set its fields, e.g. '{key}.{first}'")
    optional = isinstance(field, FieldReference)
    declared = parent.get_type(name)
    if declared is type(None):
        raise ConfigError(
            f"config key '{key}' is None with no declared type; declare it in the config file as "
            f"ml_collections.config_dict.placeholder(<type>) to make it settable"
        )
    if raw is None and declared is not bool:
        raise ConfigError(f"config key '{key}' needs a value: --config.{key}=VALUE")
    try:
        parent[name] = None if optional and raw == "None" else _parse("true" if raw is None else raw, declared)
    except (ValueError, SyntaxError, TypeError):
        expected = declared.__name__ + (" or None" if optional else "")
        if declared is bool:
            expected += f" ({'/'.join(_TRUE)} or {'/'.join(_FALSE)})"
        raise ConfigError(f"config key '{key}' expects {expected}, got {raw!r}") from None


def _parse_mapping(key: str, raw: str | None) -> dict[str, str]:
    """A whole mapping section from a dict literal of strings, e.g. ``{'instruction': 'instruction'}``."""
    try:
        value = ast.literal_eval(raw) if raw is not None else None
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"config key '{key}' is a mapping: give a dict of strings, e.g. --config.{key}="
                          "\"{'name': 'column'}\", or set one entry with --config." + key + ".NAME=VALUE")
    return value


def _parse(raw: str, declared: type) -> Any:
    """Parses command-line text as a value of the ``declared`` type (ValueError if it is not one)."""
    if declared is bool:
        if raw.lower() not in _TRUE + _FALSE:
            raise ValueError(raw)
        return raw.lower() in _TRUE
    if declared in (int, float, str):
        return declared(raw)
    if declared in (tuple, list):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if "," in raw:
                raise
            value = raw
        return declared(value) if isinstance(value, (tuple, list)) else declared((value,))
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _lookup(cfg: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    """Returns the section holding dotted ``key`` and its last name, or raises a did-you-mean error. A name a
    mapping section (MAPPING_SECTIONS) lacks is returned too: it is an entry to add."""
    *sections, name = key.split(".")
    node = cfg
    for section in sections:
        child = node.get(section)
        if not isinstance(child, ConfigDict):
            raise _unknown_key(cfg, key)
        node = child
    if name not in node and not (sections and sections[-1] in MAPPING_SECTIONS):
        raise _unknown_key(cfg, key)
    return node, name


def _unknown_key(cfg: ConfigDict, key: str) -> UnknownConfigKey:
    """Suggests the most similar valid key, else lists the keys of the deepest section that exists."""
    scored = [(_similarity(key, path), path) for path in _leaf_paths(cfg)]
    score, closest = max(scored, default=(0.0, ""))
    if score >= 0.6:
        return UnknownConfigKey(f"unknown config key '{key}'; did you mean '{closest}'?", key, cfg)
    section, path = cfg, []
    for name in key.split(".")[:-1]:
        if not isinstance(section.get(name), ConfigDict):
            break
        section, path = section[name], path + [name]
    where = f"keys under '{'.'.join(path)}'" if path else "top-level keys"
    return UnknownConfigKey(f"unknown config key '{key}'; {where}: {', '.join(section.keys())}", key, cfg)


def _similarity(key: str, path: str) -> float:
    """Similarity of two dotted keys, ignoring the sections they share (which would inflate it)."""
    key_parts, path_parts = key.split("."), path.split(".")
    while len(key_parts) > 1 and len(path_parts) > 1 and key_parts[0] == path_parts[0]:
        key_parts, path_parts = key_parts[1:], path_parts[1:]
    return difflib.SequenceMatcher(None, ".".join(key_parts), ".".join(path_parts)).ratio()


def _leaf_paths(cfg: ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for name, value in cfg.items():
        if isinstance(value, ConfigDict):
            paths += _leaf_paths(value, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def validate_choice(cfg: ConfigDict, key: str, choices: Sequence[str], *, prefix: str = "") -> str:
    """Returns ``cfg[key]`` if it is one of ``choices``; ``prefix`` is where cfg sits, for the message."""
    parent, name = _lookup(cfg, key)
    value = parent[name]
    if value in choices:
        return value
    label = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{label} must be one of {', '.join(map(repr, choices))}; got {value!r}{hint}")


def describe_config(cfg: ConfigDict) -> str:
    """Every key of ``cfg`` as ``key: type = value`` lines (dotted keys, file order), for ``--print-config``."""
    lines = []
    for path in _leaf_paths(cfg):
        parent, name = _lookup(cfg, path)
        field = dict(parent.items(preserve_field_references=True))[name]
        declared = parent.get_type(name)
        type_name = "untyped" if declared is type(None) else declared.__name__
        if isinstance(field, FieldReference) and field.get() is None:
            type_name += " or None"
        lines.append(f"{path}: {type_name} = {parent[name]!r}")
    return "\n".join(lines)


def config_changes(saved: dict, current: dict, ignore: Sequence[str] = ()) -> list[str]:
    """``key: saved -> current`` for every dotted key whose value differs between two ``to_dict()`` configs (JSON
    round-tripped, so tuples and lists compare equal); keys in ``ignore`` are skipped."""
    flat = lambda tree: {p: v for p, v in _flat_items(json.loads(json.dumps(tree)))}  # noqa: E731
    was, now = flat(saved), flat(current)
    return [f"{key}: {was.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(was) | set(now))
            if key not in ignore and was.get(key) != now.get(key)]


def _flat_items(tree: dict, prefix: str = ""):
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat_items(value, f"{prefix}{name}.")
        else:
            yield prefix + name, value


def check_writable_dir(path: str | Path, key: str) -> None:
    """ConfigError naming `key` when directory `path` could not be made or written: a file where it or a parent
    directory should be, or a directory this process cannot create entries in (probed by making and removing a
    temporary directory in `path` or its nearest existing parent, so nothing is left and root's permissions count
    as they are). Checked before a model loads, so a bad path fails at once."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key} {path}: {existing} is a file, not a directory; set {key} to a directory path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-check-"))
    except OSError as e:
        raise ConfigError(f"{key} {path} cannot be written ({existing}: {e.strerror}); set {key} to a writable "
                          f"directory") from None


def save_config(cfg: ConfigDict, run_dir: str | Path) -> Path:
    """Writes ``config.json`` (values, for people and tools) and ``config.py`` (exact, reloadable).

    ``config.py`` keeps tuples and typed optional fields, and is itself a config file:
    ``--config RUN_DIR/config.py`` repeats the run. Linked fields are saved as their values.
    """
    source = (
        '"""Resolved config of this run; reload with automodel_jax.config.load_saved_config."""\n'
        "from ml_collections import ConfigDict\n"
        "from ml_collections.config_dict import FieldReference\n\n\n"
        f"def get_config():\n    return {_python_source(cfg, '', 1)}\n"
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    path = run_dir / "config.py"
    path.write_text(source)
    return path


def load_saved_config(run_dir: str | Path) -> ConfigDict:
    """Loads the config that ``save_config`` wrote into ``run_dir``."""
    path = Path(run_dir) / "config.py"
    if not path.is_file():
        raise ConfigError(f"no saved config in '{run_dir}': {path.name} is missing (written by save_config)")
    cfg = load_config_file(str(path))
    cfg.lock()
    return cfg


def _python_source(value: Any, key: str, depth: int) -> str:
    """Python expression that rebuilds ``value`` (a config field) exactly."""
    if isinstance(value, ConfigDict):
        lines = ["ConfigDict({"]
        for name, field in value.items(preserve_field_references=True):
            field_source = _python_source(field, f"{key}.{name}" if key else name, depth + 1)
            lines.append(f"{'    ' * (depth + 1)}{name!r}: {field_source},")
        return "\n".join(lines + ["    " * depth + "})"])
    if isinstance(value, FieldReference):
        field_type = value.get_type()
        if field_type not in _BUILTIN_TYPES:
            raise ConfigError(f"config key '{key}' is typed {field_type.__name__}, which save_config cannot write")
        return f"FieldReference({_python_source(value.get(), key, depth)}, field_type={field_type.__name__})"
    if isinstance(value, list):
        return "[" + ", ".join(_python_source(v, key, depth) for v in value) + "]"
    if isinstance(value, tuple):
        items = [_python_source(v, key, depth) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, float) and not math.isfinite(value):
        return f"float('{value}')"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise ConfigError(f"config key '{key}' holds a {type(value).__name__}, which save_config cannot write")
