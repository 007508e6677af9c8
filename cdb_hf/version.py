"""The package's version, in a module of its own: setup.cfg reads it, and run_dir stamps it into every run
marker without importing the package."""

__version__ = "0.1.0"
