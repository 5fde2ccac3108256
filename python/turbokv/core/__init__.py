"""The ops and what defines them: formats (the registry), rotations, the PyTorch reference of every
op, and the typed wrappers of the native ops. Needs no transformers."""
