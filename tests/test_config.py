import json
import re
import textwrap

import pytest
from ml_collections import ConfigDict

from automodel_jax.config import (
    ConfigError,
    load_saved_config,
    parse_config,
    save_config,
    validate_choice,
)

CONFIG_SOURCE = """
from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference, placeholder

PRESETS = ("tiny", "big")


def get_config(preset: str = ""):
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.name = "run"
    cfg.use_lora = False
    cfg.max_steps = placeholder(int)
    cfg.eval_every = FieldReference(100, field_type=int)
    cfg.unset = None
    cfg.optim = ConfigDict(dict(name="adamw", learning_rate=1e-5, betas=(0.9, 0.999)))
    cfg.data = ConfigDict(dict(columns=("question", "answer"), path="/data"))
    if preset == "big":
        cfg.optim.learning_rate = 1e-4
    return cfg
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text(CONFIG_SOURCE)
    return str(path)


def write(tmp_path, source, name="other.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_defaults_and_preset(config_file):
    cfg = parse_config(["--config", config_file])
    assert cfg.optim.learning_rate == 1e-5 and cfg.max_steps is None and cfg.eval_every == 100
    assert parse_config([f"--config={config_file}:big"]).optim.learning_rate == 1e-4


def test_overrides_are_parsed_by_field_type(config_file):
    cfg = parse_config(
        [
            "--config", config_file,
            "--config.optim.learning_rate=3e-4",
            "--config.seed", "7",
            "--config.use_lora",
            "--config.name=my run",
            "--config.optim.betas=(0.8, 0.95)",
            "--config.data.columns=prompt",
            "--config.max_steps=12",
            "--config.eval_every=None",
            "--config.data.path=",
        ]
    )
    assert cfg.optim.learning_rate == 3e-4 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.seed == 7 and cfg.use_lora is True and cfg.name == "my run"
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.data.columns == ("prompt",)
    assert cfg.max_steps == 12 and cfg.eval_every is None and cfg.data.path == ""


def test_float_field_takes_an_int_and_bools_read_words(config_file):
    cfg = parse_config(["--config", config_file, "--config.optim.learning_rate=1", "--config.use_lora=False"])
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.use_lora is False


def test_last_override_wins_and_config_is_locked(config_file):
    cfg = parse_config(["--config", config_file, "--config.seed=1", "--config.seed=2"])
    assert cfg.seed == 2
    with pytest.raises(AttributeError):
        cfg.sead = 3


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.optim.learnig_rate=1",
            "unknown config key 'optim.learnig_rate'; did you mean 'optim.learning_rate'?",
        ),
        ("--config.learning_rate=1", "unknown config key 'learning_rate'; did you mean 'optim.learning_rate'?"),
        ("--config.optim.zzz=1", "unknown config key 'optim.zzz'; keys under 'optim': betas, learning_rate, name"),
        ("--config.qqq.x=1", "unknown config key 'qqq.x'; top-level keys: data, eval_every, max_steps"),
        ("--config.seed=abc", "config key 'seed' expects int, got 'abc'"),
        ("--config.seed=1.5", "config key 'seed' expects int, got '1.5'"),
        ("--config.optim.learning_rate=fast", "config key 'optim.learning_rate' expects float, got 'fast'"),
        ("--config.use_lora=maybe",
         "config key 'use_lora' expects bool (true/yes/on/1 or false/no/off/0), got 'maybe'"),
        ("--config.seed=None", "config key 'seed' expects int, got 'None'"),
        ("--config.max_steps=many", "config key 'max_steps' expects int or None, got 'many'"),
        ("--config.optim.betas=0.1 0.2, 3", "config key 'optim.betas' expects tuple, got '0.1 0.2, 3'"),
        ("--config.unset=1", "config key 'unset' is None with no declared type; declare it in the config file as"),
        ("--config.optim=1", "config key 'optim' is a section; set its fields, e.g. 'optim.betas'"),
        ("--config.seed", "config key 'seed' needs a value: --config.seed=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(config_file, override, message):
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", config_file, override])
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_bad_command_lines(config_file, tmp_path):
    cases = [
        ([], "missing --config PATH[:PRESET]"),
        (["--config"], "--config needs a value"),
        (["--config", config_file, "--config", config_file], "--config given twice"),
        (["--config", config_file, "--steps=3"], "unexpected argument '--steps=3'"),
        (["--config", str(tmp_path / "nope.py")], f"config file '{tmp_path / 'nope.py'}' not found"),
        (["--config", f"{config_file}:huge"], f"unknown preset 'huge' for '{config_file}'; known presets: 'tiny', 'big'"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            parse_config(argv)


def test_bad_config_files(tmp_path):
    no_function = write(tmp_path, "x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        parse_config(["--config", no_function])
    no_preset = write(tmp_path, "from ml_collections import ConfigDict\ndef get_config():\n    return ConfigDict()\n")
    with pytest.raises(ConfigError, match=r"takes no preset; drop ':small'"):
        parse_config(["--config", f"{no_preset}:small"])
    plain_dict = write(tmp_path, "def get_config(preset=''):\n    return {'a': 1}\n")
    with pytest.raises(ConfigError, match="returned dict, not a ConfigDict"):
        parse_config(["--config", plain_dict])
    not_python = write(tmp_path, "a: 1\n", name="cfg.yaml")
    with pytest.raises(ConfigError, match="is not a Python file"):
        parse_config(["--config", not_python])


def test_save_and_load_round_trip(config_file, tmp_path):
    cfg = parse_config(["--config", config_file, "--config.max_steps=5", "--config.optim.betas=(0.5,)"])
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir)

    assert json.loads((run_dir / "config.json").read_text())["optim"]["betas"] == [0.5]
    loaded = load_saved_config(run_dir)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.optim.betas == (0.5,) and loaded.data.columns == ("question", "answer")
    # Typed optional fields stay optional and typed; the saved file is itself a config file.
    again = parse_config(["--config", str(run_dir / "config.py"), "--config.max_steps=None", "--config.eval_every=9"])
    assert again.max_steps is None and again.eval_every == 9
    with pytest.raises(ConfigError, match="expects int or None"):
        parse_config(["--config", str(run_dir / "config.py"), "--config.max_steps=x"])


def test_save_round_trips_lists_and_special_floats(tmp_path):
    cfg = ConfigDict(dict(layers=[0, 1], clip=float("inf"), nested=dict(pairs=((1, 2), (3, 4)))))
    save_config(cfg, tmp_path)
    loaded = load_saved_config(tmp_path)
    assert loaded.layers == [0, 1] and loaded.clip == float("inf") and loaded.nested.pairs == ((1, 2), (3, 4))


def test_save_rejects_values_it_cannot_write(tmp_path):
    with pytest.raises(ConfigError, match="config key 'model.dtype' holds a type"):
        save_config(ConfigDict(dict(model=dict(dtype=float))), tmp_path)


def test_load_saved_config_needs_a_saved_run(tmp_path):
    with pytest.raises(ConfigError, match="no saved config in .*config.py is missing"):
        load_saved_config(tmp_path)


def test_validate_choice(config_file):
    cfg = parse_config(["--config", config_file, "--config.optim.name=adamx"])
    assert validate_choice(cfg, "data.path", ("/data", "/other")) == "/data"
    with pytest.raises(ConfigError) as error:
        validate_choice(cfg.optim, "name", ("adamw", "sgd"), prefix="optim")
    assert str(error.value) == "optim.name must be one of 'adamw', 'sgd'; got 'adamx'; did you mean 'adamw'?"


MAPPING_SOURCE = """
from ml_collections import ConfigDict


def get_config():
    cfg = ConfigDict()
    cfg.data = ConfigDict(dict(train=dict(columns=dict(instruction="instruction", answer="output"), path="x")))
    return cfg
"""


def test_a_mapping_section_takes_new_entries_and_whole_dicts(tmp_path):
    spec = write(tmp_path, MAPPING_SOURCE)
    cfg = parse_config(["--config", spec, "--config.data.train.columns.input=input",
                        "--config.data.train.columns.answer=response"])
    assert cfg.data.train.columns.to_dict() == dict(instruction="instruction", input="input", answer="response")
    with pytest.raises(AttributeError):
        cfg.data.train.pathh = "y"  # sections that are not mappings stay locked
    replaced = parse_config(["--config", spec, "--config.data.train.columns={'question': 'q', 'answer': 'a'}",
                             "--config.data.train.columns.context=c"])
    assert replaced.data.train.columns.to_dict() == dict(question="q", answer="a", context="c")
    save_config(replaced, tmp_path / "run")
    assert load_saved_config(tmp_path / "run").data.train.columns.to_dict() == replaced.data.train.columns.to_dict()


@pytest.mark.parametrize("override, message", [
    ("--config.data.train.columns=prompt", "config key 'data.train.columns' is a mapping: give a dict of strings"),
    ("--config.data.train.columns={'answer': 1}", "config key 'data.train.columns' is a mapping"),
    ("--config.data.train.columns.input", "config key 'data.train.columns.input' needs a value"),
    ("--config.data.train.colums.input=input", "unknown config key 'data.train.colums.input'"),
    ("--config.data.train.paths=y", "unknown config key 'data.train.paths'; did you mean 'data.train.path'?"),
])
def test_bad_mapping_overrides_are_clear_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(["--config", write(tmp_path, MAPPING_SOURCE), override])
