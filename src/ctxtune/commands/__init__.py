"""Command-line commands. Each module exposes `register(app)`; `ctxtune.cli` lists the modules."""
