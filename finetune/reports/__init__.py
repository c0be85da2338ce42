"""Files for a person: the evaluation tables and plots tasks draw, learning curves, the model card."""
