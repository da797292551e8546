from dpt_jax.cli import use_compilation_cache

# Many tests compile the same tiny programs (in-process and in subprocesses): share compilations.
use_compilation_cache()
