"""Deployment runtimes: their names and settings without torch (runtime.py), the runners that time or run a model in each (runners.py), and the models a benchmark names (specs.py)."""
