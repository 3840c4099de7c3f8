"""Models: the bundled default model and loading by name or path."""
