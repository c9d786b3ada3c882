"""Builds dcnlab._C, the compiled deformable convolution op.

CUDA sources are compiled when nvcc and a CUDA build of torch are present. DCNLAB_WITH_CUDA=1
forces them on, DCNLAB_WITH_CUDA=0 off. TORCH_CUDA_ARCH_LIST overrides the default archs
(sm_80 and sm_90).
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The nvcc on PATH may be a wrapper script outside the toolkit, which makes torch guess a
# CUDA_HOME without headers; prefer the real toolkit folder when it exists.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def with_cuda() -> bool:
    forced = os.environ.get("DCNLAB_WITH_CUDA")
    if forced is not None:
        return forced.strip().lower() not in ("0", "false", "no", "off", "")
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc")
    )
    return has_nvcc and torch.version.cuda is not None


def cuda_wheel_include_dirs() -> list[str]:
    """Headers of the CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include.

    A toolkit may ship without them while the nvidia-* wheels that torch depends on carry them.
    They are searched after the toolkit's own headers.
    """
    try:
        import nvidia  # the namespace package of the nvidia-* wheels
    except ImportError:
        return []
    toolkit = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    dirs = []
    for root in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(include, "cusparse.h")) and not os.path.exists(
                os.path.join(toolkit, "cusparse.h")
            ):
                dirs.append(include)
    return dirs


def extension():
    sources = sorted(
        glob.glob("csrc/*.cpp")
        + glob.glob("csrc/cpu/*.cpp")
        + glob.glob("csrc/autocast/*.cpp")
        + glob.glob("csrc/autograd/*.cpp")
    )
    cxx_flags = ["-O3", "-fopenmp"]
    if with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        fallback_includes = [flag for d in cuda_wheel_include_dirs() for flag in ("-idirafter", d)]
        return CUDAExtension(
            "dcnlab._C",
            sources,
            define_macros=[("DCNLAB_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags + fallback_includes,
                "nvcc": ["-O3", "-lineinfo"] + [f"-Xcompiler={flag}" for flag in fallback_includes],
            },
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return CppExtension(
        "dcnlab._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    # The Hydra configs live in the top-level conf/ and install as the package dcnlab.conf.
    packages=find_packages(include=["dcnlab", "dcnlab.*"]) + ["dcnlab.conf"],
    package_dir={"dcnlab.conf": "conf"},
    package_data={"dcnlab.conf": ["*.yaml", "*/*.yaml"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
