"""dpt-jax: Discriminative Probing and Tuning (DPT, CVPR 2024) for Stable Diffusion in JAX/Flax."""
from typing import Any, Optional

__version__ = "0.1.0"


def load_pretrained(path: str, dtype: Any = None, param_dtype: Any = None, variant: Optional[str] = None,
                    remat: bool = False) -> Any:
    """Load a local diffusers-format Stable Diffusion directory: see :mod:`dpt_jax.pipeline`."""
    import jax.numpy as jnp
    from dpt_jax.pipeline import load_pretrained as _load
    return _load(path, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32, variant=variant,
                 remat=remat)


__all__ = ["load_pretrained", "__version__"]
