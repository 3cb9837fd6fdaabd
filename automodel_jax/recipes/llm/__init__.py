"""LLM fine-tuning: the recipe (`finetune`), its embedded offline default (`embedded`) and config presets."""
