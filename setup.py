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
    # The card templates stay in the top-level model_cards/ and ship inside the package as
    # moma_hf/model_cards/, where moma_hf.evaluation.model_card looks first; metric scripts are plain files,
    # not modules.
    packages=find_packages(include=["moma_hf", "moma_hf.*"]) + ["moma_hf.model_cards"],
    package_dir={"moma_hf.model_cards": "model_cards"},
    package_data={"moma_hf": ["evaluation/metric_scripts/*/*.py"], "moma_hf.model_cards": ["*.j2"]},
    # Every dependency is capped below its next major release (for 0.x releases, below 1.0).
    install_requires=[
        # torch/torchvision: the releases that install from this project's local wheels.
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "transformers>=5.0,<6",
        "datasets>=5.0,<6",
        "accelerate>=1.15,<2",
        "huggingface_hub>=2.0,<3",
        "timm>=1.0.12,<2",
        "evaluate>=0.4.6,<1",
        "safetensors>=0.4,<1",
        "pillow>=10,<14",
        "numpy>=1.26,<3",
        "pyyaml>=6,<7",
        "jinja2>=3.1,<4",
        "matplotlib>=3.8,<4",
        "tensorboard>=2.15,<3",
        "scipy>=1.11,<2",  # moma-compare's confidence intervals
    ],
    extras_require={"dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "ruff>=0.8,<1", "scikit-learn>=1.3,<2"]},
    entry_points={
        "console_scripts": [
            "moma-distill = moma_hf.commands.distill:main",
            "moma-train-teacher = moma_hf.commands.train_teacher:main",
            "moma-evaluate = moma_hf.commands.evaluate:main",
            "moma-compare = moma_hf.commands.compare:main",
            "moma-probe = moma_hf.commands.probe:main",
        ]
    },
)
