"""MLflow: the run tracker, the logged model, the registry and its champion, comparing runs."""
