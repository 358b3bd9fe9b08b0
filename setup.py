"""Build and install lowrank.

The native library in csrc/ is a torch-free C ABI (see csrc/lowrank.h): g++ always
builds the CPU half, nvcc builds the CUDA half when it is on the PATH. Neither build may fail the
install: on error we warn, and lowrank falls back to its pure-torch path at run time.

Environment knobs:
  LOWRANK_NO_NATIVE=1        skip both native builds
  LOWRANK_NO_CUDA=1          skip the nvcc build even when nvcc is present
  LOWRANK_CUDA_ARCHS="80 90" compute capabilities to build for (default: 80 90)
"""
import os
import shutil
import subprocess
import sys
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _run(cmd):
    print("[lowrank] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


MANIFEST_NAME = "manifest.json"  # lowrank/native.py checks each library against it before mapping it


def _record_in_manifest(out_dir, lib_path):
    """Write lib_path's size and SHA-256 into out_dir/manifest.json (atomically): lowrank maps only a
    library that matches what the build wrote."""
    import hashlib
    import json

    manifest = os.path.join(out_dir, MANIFEST_NAME)
    try:
        with open(manifest, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    with open(lib_path, "rb") as f:
        data = f.read()
    entries[os.path.basename(lib_path)] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    tmp = manifest + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, manifest)


def build_native(out_dir):
    """Compile csrc/ into out_dir/liblowrank_cpu.so and (with nvcc) liblowrank_cuda.so."""
    if os.environ.get("LOWRANK_NO_NATIVE") == "1":
        warnings.warn("lowrank: LOWRANK_NO_NATIVE=1, native library not built")
        return
    os.makedirs(out_dir, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    cpu_out = os.path.join(out_dir, "liblowrank_cpu.so")
    try:
        # -ffp-contract=off: merge rounds in a stated order; a fused multiply-add would change it.
        arch = ["-march=x86-64-v2"] if _is_x86() else []
        _run([cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", *arch,
              "-I", CSRC, os.path.join(CSRC, "merge_cpu.cpp"), os.path.join(CSRC, "nf4_cpu.cpp"),
              os.path.join(CSRC, "dora_cpu.cpp"), "-o", cpu_out])
        _record_in_manifest(out_dir, cpu_out)
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"lowrank: CPU native library not built ({exc}); using the torch fallback")

    nvcc = shutil.which("nvcc")
    if os.environ.get("LOWRANK_NO_CUDA") == "1" or nvcc is None:
        print("[lowrank] nvcc not found or disabled: CUDA native library not built", flush=True)
        return
    archs = os.environ.get("LOWRANK_CUDA_ARCHS", "80 90").replace(";", " ").split()
    gencode = []
    for arch in archs:
        gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    arch_names = " ".join(f"sm_{a}" for a in archs)
    try:
        _run([nvcc, "-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC", "-cudart=static",
              f'-DLOWRANK_CUDA_ARCHS="{arch_names}"', *gencode, "-I", CSRC,
              os.path.join(CSRC, "merge_cuda.cu"), "-o", os.path.join(out_dir, "liblowrank_cuda.so")])
        _record_in_manifest(out_dir, os.path.join(out_dir, "liblowrank_cuda.so"))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"lowrank: CUDA native library not built ({exc}); using Triton/torch instead")


def _is_x86():
    import platform

    return platform.machine() in ("x86_64", "AMD64")


class BuildPyWithNative(build_py):
    """build_py that also compiles the native library into lowrank/_lib."""

    def run(self):
        if getattr(self, "editable_mode", False):
            out = os.path.join(HERE, "lowrank", "_lib")
        else:
            out = os.path.join(self.build_lib, "lowrank", "_lib")
        build_native(out)
        super().run()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "build_native":
    build_native(os.path.join(HERE, "lowrank", "_lib"))
    sys.exit(0)

setup(
    name="lowrank",
    version="0.1.0",
    description="LoRA / QLoRA kernel engine for PyTorch: fused Triton kernels, exact NF4, native merge",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # (the Triton kernels live in lowrank/kernels/: a top-level kernels/ in the source tree, mapped
    # to lowrank.kernels at install, shadowed Hugging Face's `kernels` package, which transformers
    # >= 5.25 imports, wherever the tree was on sys.path: pytest, python -m from the checkout)
    packages=["lowrank", "lowrank.ops", "lowrank.kernels"],
    package_data={"lowrank": ["_lib/*.so", "_lib/manifest.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "safetensors>=0.4",
        "bitsandbytes>=0.45",
        "rich>=13",  # lowrank plan / compare tables
        "tqdm>=4.60",  # progress bars
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            # Triton's interpreter: 3.6.0 is what the GPU machine runs; numpy >= 2.4 breaks it.
            "triton==3.6.0; platform_system == 'Linux'",
            "numpy<2.4",
            "peft==0.21.2",
            "transformers>=5,<6",
            "matplotlib>=3.7",
            # lowrank.trainer_class(trl.SFTTrainer) is tested with TRL (and the datasets it needs)
            "trl>=1.0",
        ],
        # lowrank plan / compare read transformers configs and models; compare draws its curves
        "jobs": ["transformers>=5,<6", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["lowrank=lowrank.cli:entry"]},
    cmdclass={"build_py": BuildPyWithNative},
)
