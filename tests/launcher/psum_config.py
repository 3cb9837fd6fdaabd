"""Config for psum_program.py, loaded through ml_collections config_flags like the fine-tuning recipe's."""

import ml_collections


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """`preset` "wide" doubles the rows so the preset syntax CFG:preset is exercised end to end."""
    config = ml_collections.ConfigDict()
    config.run_dir = ""
    config.rows_per_device = 2 if preset != "wide" else 4
    config.init_timeout_s = 60
    return config
