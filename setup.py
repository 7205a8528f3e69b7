"""Packaging for keye_train; `make install` is the supported way to set it up on a CPU machine."""

from setuptools import find_packages, setup

setup(
    name="keye_train",
    version="0.1.0",
    description="Distributed pre-training of Keye-VL-1.5-style multimodal models",
    packages=find_packages(include=["keye_train", "keye_train.*"]),
    # The chat template copied into every Hugging Face export (keye-convert export).
    package_data={"keye_train.checkpoint.remote": ["*.jinja"]},
    python_requires=">=3.11",
    # torch is not pinned here: GPU clusters bring their own build. On a CPU machine `make install`
    # installs torch==2.13.0 first so that nothing pulls CUDA wheels.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pillow",
        "av",
        "safetensors",
        "tokenizers",
        "hydra-core>=1.3",
        "omegaconf",
        "webdataset",
        "pyyaml",
        "tqdm",
        "pyzmq",
        "matplotlib==3.11.2",  # keye-report's curves (PNG, Agg backend)
        # parquet inputs of `keye-data convert` (caption, interleaved)
        "pyarrow>=14",
        # Ulysses context parallelism (DistributedAttention). DeepSpeed ships only a source package whose
        # build imports torch, so `make install` installs it with --no-build-isolation (no CUDA torch).
        "deepspeed",
    ],
    extras_require={
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        "dev": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "transformers>=4.51",
            "opencv-python-headless",
            "decord",
            "einops",  # imported by keye-vl-utils (the preprocessing reference)
        ],
    },
    entry_points={
        "console_scripts": [
            "keye-convert=keye_train.cli.convert:main",
            "keye-data=keye_train.cli.data:main",
            "keye-demo=keye_train.cli.demo:main",
            "keye-estimate=keye_train.cli.estimate:main",
            "keye-train=keye_train.cli.train:main",
            "keye-merge=keye_train.cli.merge:main",
            "keye-ioserver=keye_train.cli.ioserver:main",
            "keye-report=keye_train.cli.report:main",
        ]
    },
)
