"""The shipped shapes-world SD (``builtin:shapes``): data files, read by path (dpt_jax/builtin_models.py)."""
