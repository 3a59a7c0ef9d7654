"""Dataset builders and readers."""
