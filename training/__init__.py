"""Training beside engine.py: distillation losses and teachers (losses.py), a run folder's files and resume rules (run_folder.py)."""
