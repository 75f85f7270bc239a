"""Pure journey logic: definitions, validation, the step function, templates, backtests, statistics."""
