"""Build fastpref._C from csrc/ against the installed torch.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu) are added when the
installed torch is a CUDA build and nvcc is found; otherwise one line in the build log says
they were skipped. The Triton kernels are the subpackage fastpref/kernels/ (`fastpref.kernels`);
they once lived in a top-level kernels/, which shadowed Hugging Face's `kernels` package (a
dependency of transformers >= 5.25) for any Python started in the checkout.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute source paths in some versions.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG"]
    link = ["-fopenmp"]
    if os.environ.get("FASTPREF_ASAN") == "1":
        # AddressSanitizer build for tests/test_ops_asan.py (CPU kernels only; built into a
        # separate directory with --build-lib/--build-temp, never over fastpref/_C*.so). -O1
        # keeps the build short and the reports readable; assertions stay on.
        cxx = [
            "-O1",
            "-g",
            "-std=c++17",
            "-fopenmp",
            "-fsanitize=address",
            "-fno-omit-frame-pointer",
        ]
        link = ["-fopenmp", "-fsanitize=address"]
        os.environ["FASTPREF_SKIP_CUDA"] = "1"
    if os.environ.get("FASTPREF_NATIVE_ARCH", "1") == "1" and sys.platform == "linux":
        # The vectorised epilogues want AVX2/AVX-512 where the build machine has them.
        # Set FASTPREF_NATIVE_ARCH=0 to build a portable binary.
        cxx.append("-march=native")
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda = torch_has_cuda() and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if with_cuda and os.environ.get("FASTPREF_SKIP_CUDA") != "1":
        print("fastpref: building CUDA kernels with nvcc from", cpp_extension.CUDA_HOME)
        return cpp_extension.CUDAExtension(
            "fastpref._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx + ["-DFASTPREF_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17"],
            },
            extra_link_args=link,
        )
    print(
        "fastpref: skipping CUDA kernels (torch "
        f"{torch_version()} is not a CUDA build or nvcc was not found); "
        "building the CPU kernels only"
    )
    return cpp_extension.CppExtension(
        "fastpref._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


def torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def torch_version() -> str:
    import torch

    return torch.__version__


setup(
    packages=find_packages(include=["fastpref", "fastpref.*"]),
    package_data={"fastpref": ["assets/**/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
