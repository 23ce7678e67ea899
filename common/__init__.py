"""What every layer shares, without torch: one-line user errors and the command-line runner (errors.py), atomic writes and run locks (files.py)."""
