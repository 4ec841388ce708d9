"""Install dsincubate: `pip install -e .` (the README's `make` targets do this in a virtualenv).

The fused CUDA ops in csrc/ are compiled just in time on first use (ninja). Set DSI_BUILD_OPS=1 to build them at
install time instead (needs CUDA_HOME and a CUDA build of torch), as DeepSpeed's DS_BUILD_OPS does.
"""
import glob
import os

from setuptools import find_packages, setup

if os.environ.get("DSI_BUILD_OPS") == "1":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dsincubate.ops.builder import prebuild_all

    prebuild_all()

setup(
    name="dsincubate",
    version="0.1.0",
    description="Deep Incubation (modular training of large ViTs) on DeepSpeed",
    # csrc/ ships inside the package as dsincubate/csrc (dsincubate.ops.builder looks there first), so a
    # non-editable install can JIT-build the kernels; the verification record feeds `dsincubate ops`.
    packages=find_packages(include=["dsincubate", "dsincubate.*"]) + ["dsincubate.csrc"],
    package_dir={"dsincubate.csrc": "csrc"},
    package_data={"dsincubate.csrc": ["*/*.cu", "*/*.cuh", "*/*.h", "*/*.cpp"],
                  "dsincubate.ops": ["kernel_verification.json"]},
    # A non-editable install carries the shipped ds_configs to <prefix>/share/dsincubate (dsincubate.dsconfig looks there).
    data_files=[("share/dsincubate/ds_configs", sorted(glob.glob("ds_configs/*.json")))],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16",
        "timm>=1.0.9",
        "webdataset>=0.2.90",
        "safetensors",
        "tensorboardX",
        "psutil",
        "tqdm",
        "numpy",
        "ninja",
        "matplotlib",
    ],
    # data.backend=dali: NVIDIA DALI for CUDA 13 (a 199 MB wheel, ~0.6 GB installed with its nvImageCodec/nvJPEG
    # wheels; 2.5 s download + 6.4 s install measured here). The test extra installs it so CI runs the DALI tests
    # on the CPU; and ruff for `make lint` (a 10 MB wheel, 2.3 s download measured here).
    extras_require={"dali": ["nvidia-dali-cuda130"],
                    "test": ["pytest", "hypothesis", "tensorboard", "nvidia-dali-cuda130", "ruff"]},
    entry_points={"console_scripts": ["dsincubate=dsincubate.cli:main"]},
)
