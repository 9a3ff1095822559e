"""The ``imagebackend`` command line."""
