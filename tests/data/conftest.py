"""Shared fixtures for the data tests: the real stories260K tokenizer (no pad token, no chat template)."""
from pathlib import Path

import pytest
from transformers import AutoTokenizer

MODEL = Path(__file__).resolve().parents[2] / ".." / "shared" / "assets" / "models" / "stories260K"


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="session")
def chat_template() -> str:
    """Ends each assistant turn with EOS and cues a reply with "Assistant: " (stories260K ships no template)."""
    return ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}"
            "{{ eos_token }}\n{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant: {% endif %}")
