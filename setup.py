"""Packaging for moma-hf: MoMA knowledge distillation on the Hugging Face stack."""
from setuptools import find_packages, setup

setup(
    name="moma-hf",
    version="0.1.0",
    description=(
        "MoMA: momentum contrastive knowledge distillation with multi-head attention, "
        "for histopathology models, on transformers/datasets/accelerate"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["moma_hf", "moma_hf.*"]),
    package_data={"moma_hf": ["metrics/*/*.py"]},
    install_requires=[
        # torch/torchvision: the releases that install from this project's local wheels.
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "transformers>=5.0,<6",
        "datasets>=5.0,<6",
        "accelerate>=1.15",
        "huggingface_hub>=2.0,<3",
        "timm>=1.0.12",
        "evaluate>=0.4.6",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.26",
        "pyyaml>=6",
        "jinja2>=3.1",
        "matplotlib>=3.8",
        "tensorboard>=2.15",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "scipy>=1.11"]},  # scipy: benchmark statistics
)
