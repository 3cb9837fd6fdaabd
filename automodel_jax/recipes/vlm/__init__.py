"""Vision-language fine-tuning: the recipe, its embedded offline default (processors and a rendered visual task)."""
