"""The recipe: the typed, validated description of one run (schema, defaults, overrides, field help)."""
