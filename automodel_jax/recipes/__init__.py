"""Recipes: thin compositions of the components, read top to bottom in named phases.

`llm`: LLM fine-tuning (LoRA or full SFT); `vlm`: vision-language fine-tuning. Recipes may import any component;
no component imports a recipe (checked by import-linter, see pyproject.toml).
"""
