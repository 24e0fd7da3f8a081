"""Attention backends. Each module is one backend (see vidsparse.dispatch for the interface);
backends never import one another. ``reference`` is the exact eager oracle."""
