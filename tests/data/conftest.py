"""Shared fixtures for the data tests: the real stories260K tokenizer (no pad token, no chat template)."""
import pytest
from transformers import AutoTokenizer

from reference import STORIES


@pytest.fixture(scope="session")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="session")
def chat_template() -> str:
    """Ends each assistant turn with EOS and cues a reply with "Assistant: " (stories260K ships no template)."""
    return ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}"
            "{{ eos_token }}\n{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant: {% endif %}")
