"""The GPU machine's Python, imitated on a CPU (put this folder first on PYTHONPATH): every package installed
here that the GPU machine does not have becomes unimportable, as if missing (`sys.modules[name] = None`: `import`
raises ImportError, `importlib.util.find_spec` returns None).

The GPU machine has the standard library, torch and what torch's wheel depends on, and nothing else; the device
run adds the project and the device bundle (bench/gpu/bundle.py) through PYTHONPATH. Everything else installed
in this environment (numpy, webdataset, tokenizers, megatron-core, transformers, ...) is blocked, computed from
what is installed rather than listed, so a new dependency is blocked as soon as it is installed.
"""

import importlib.metadata
import os
import pkgutil
import site
import sys

# torch's wheel and its requirements (filelock, typing-extensions, setuptools, sympy, networkx, jinja2, fsspec),
# their own requirements (mpmath, markupsafe), and the modules those distributions install at top level.
GPU_MACHINE_HAS = {
    "torch", "torchgen", "functorch", "triton", "nvidia", "filelock", "typing_extensions", "setuptools",
    "pkg_resources", "_distutils_hack", "distutils-precedence", "sympy", "mpmath", "isympy", "networkx", "jinja2",
    "markupsafe", "fsspec",
}

# The distributions (metadata) the GPU machine has: the same, named as their wheels name them.
GPU_MACHINE_DISTRIBUTIONS = {"torch", "triton", "filelock", "typing-extensions", "setuptools", "sympy", "mpmath",
                             "networkx", "jinja2", "markupsafe", "fsspec"}


def _installed_top_level() -> set[str]:
    """Top-level modules of this environment's site-packages (not of PYTHONPATH, which holds the project, the
    bundle and this folder)."""
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return {module.name for module in pkgutil.iter_modules([r for r in roots if os.path.isdir(r)])}


def _bundled() -> set[str]:
    bundle = os.environ.get("MIMO_DEVICE_BUNDLE", "")
    return {module.name for module in pkgutil.iter_modules([bundle])} if os.path.isdir(bundle) else set()


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _on_the_gpu_machine(dist) -> bool:
    """A distribution the GPU machine has (torch's, or the bundle's: those found on PYTHONPATH)."""
    name = _normal(dist.metadata["Name"] or "")
    bundle = os.path.abspath(os.environ.get("MIMO_DEVICE_BUNDLE", "//none"))
    where = os.path.abspath(str(getattr(dist, "_path", "")))
    return name in GPU_MACHINE_DISTRIBUTIONS or name.startswith("nvidia-") or where.startswith(bundle + os.sep)


_discover = importlib.metadata.Distribution.discover.__func__


def _discover_present(cls, **kwargs):
    """Metadata of blocked packages is missing too (pytest loads plugins from every distribution's entry points)."""
    return (dist for dist in _discover(cls, **kwargs) if _on_the_gpu_machine(dist))


BLOCKED = sorted(_installed_top_level() - GPU_MACHINE_HAS - _bundled() - set(sys.stdlib_module_names))
for _name in BLOCKED:
    if not _name.startswith("__editable__"):  # the editable-install hook is already installed; it stays
        sys.modules[_name] = None
importlib.metadata.Distribution.discover = classmethod(_discover_present)
