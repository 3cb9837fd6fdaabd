"""What tests share besides fixtures: where the offline assets are, tiny per-family configs, state comparison, what
a terminal shows.

(Imported by name from test modules; fixtures live in conftest.py.)
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The offline assets (real weights and data, kept outside the repository): $AUTOMODEL_JAX_ASSETS, else ../shared/assets
# beside the clone. Tests that read them carry the `assets` marker (or use the `assets` fixture) and are skipped with
# one reason when they are absent (conftest.py).
ASSETS_ENV = "AUTOMODEL_JAX_ASSETS"
ASSETS = Path(os.environ.get(ASSETS_ENV) or REPO.parent / "shared" / "assets").expanduser()
STORIES = ASSETS / "models" / "stories260K"
DATA = ASSETS / "data"


def missing_assets() -> tuple[str, bool] | None:
    """None when every file the assets' SHA256SUMS lists is in place, else (one-line reason, whether the folder is
    absent altogether: tests needing it are skipped; a folder missing some of its files is broken: they fail)."""
    sums = ASSETS / "SHA256SUMS"
    hint = f"set {ASSETS_ENV} to the assets folder or place it at ../shared/assets beside the clone"
    if not sums.is_file():
        return f"offline test assets not found: {ASSETS} has no SHA256SUMS; {hint} (CONTRIBUTING.md)", True
    names = [line.split(maxsplit=1)[1].lstrip("*") for line in sums.read_text().splitlines() if line.strip()]
    missing = [name for name in names if not (ASSETS / name).is_file()]
    if not missing:
        return None
    return (f"offline test assets incomplete: {ASSETS} lacks {len(missing)} of the files its SHA256SUMS lists (first: "
            f"{missing[0]}); restore them (check with sha256sum -c SHA256SUMS) or {hint}"), False


TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)

# One tiny config per supported family beyond plain Llama: (HF model class, HF config class, config overrides).
# Windows are shorter than the 13-token test sequences so that they matter; weights are larger than HF's default
# so that soft-caps bite.
GEMMA = dict(initializer_range=0.2, head_dim=16, query_pre_attn_scalar=10, sliding_window=3)
FAMILIES = {
    "qwen2_tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2ForCausalLM", "Qwen2Config",
                      dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16)),
    "qwen3_bias_tied": ("Qwen3ForCausalLM", "Qwen3Config", dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral_sliding": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=3)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(GEMMA, num_hidden_layers=3, final_logit_softcapping=1.0, attn_logit_softcapping=2.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"],
                    rope_theta=50.0, rope_local_base_freq=7.0, rope_scaling=dict(rope_type="linear", factor=2.0),
                    final_logit_softcapping=1.5)),
    "phi3_sliding_partial_rope": ("Phi3ForCausalLM", "Phi3Config",
                                  dict(sliding_window=4, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=2)),
    "phi3_longrope": ("Phi3ForCausalLM", "Phi3Config",
                      dict(pad_token_id=0, eos_token_id=2, max_position_embeddings=32,
                           original_max_position_embeddings=8,
                           rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0],
                                             long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 40.0]))),
}


def assert_same_state(a, b):
    """Two torch modules hold bit-identical tensors under the same names and dtypes."""
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def terminal_lines(output: str) -> list[str]:
    """The lines a terminal shows for `output`: a carriage return writes the next text over the line's start."""
    lines = []
    for line in output.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines
