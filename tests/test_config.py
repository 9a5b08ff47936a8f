"""Settings: the shipped config.toml is a complete, true list of the defaults."""

import tomllib
from dataclasses import fields
from pathlib import Path

from aserve.config import Config, load_config

CONFIG_TOML = Path(__file__).resolve().parent.parent / "config.toml"


def test_config_toml_names_every_setting():
    data = tomllib.loads(CONFIG_TOML.read_text())
    assert {section: set(values) for section, values in data.items()} == {
        section.name: {setting.name for setting in fields(section.type)} for section in fields(Config)}


def test_config_toml_gives_every_setting_its_default():
    assert load_config(CONFIG_TOML) == Config()
