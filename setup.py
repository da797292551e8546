"""dpt-jax: Discriminative Probing and Tuning (DPT, CVPR 2024) for Stable Diffusion in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.13", "flax>=0.12,<0.13", "optax>=0.2.8", "orbax-checkpoint>=0.12",
    "ml_collections>=1.0", "ml_dtypes", "safetensors>=0.4", "numpy>=1.26", "transformers>=5.0",
    "tokenizers>=0.20", "pillow>=10", "tqdm>=4.60", "tensorboardX>=2.6", "scipy>=1.10",
]
# torch pinned: an unpinned requirement pulls a multi-GB CUDA build on machines without one.
TORCH = ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.24.0", "peft==0.21.2", "accelerate>=1.0"]
# dpt_jax.data.tfds_readers; TensorFlow too: the coco_captions builder's feature spec imports it.
TFDS = ["tensorflow-cpu==2.21.0", "tensorflow-datasets==4.9.10"]
TEST = TORCH + TFDS + ["pytest>=8", "pytest-xdist>=3.5"]  # tests/test_tfds_readers.py prepares tiny tfds builders

setup(
    name="dpt-jax",
    version="0.1.0",
    description="DPT (Discriminative Probing and Tuning) for Stable Diffusion in JAX/Flax",
    packages=find_packages(include=["dpt_jax", "dpt_jax.*"]),
    package_data={"dpt_jax.assets": ["shapes-sd/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",  # jax 0.10, flax 0.12, numpy 2.3, transformers 5
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "test": TEST,
        "tfds": TFDS,
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        "cuda": ["jax[cuda12]>=0.10,<0.13"],
    },
    entry_points={"console_scripts": ["dpt-jax=dpt_jax.cli:main"]},
)
