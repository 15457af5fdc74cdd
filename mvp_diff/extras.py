"""Optional extras (pyproject.toml `[project.optional-dependencies]`): the core install needs no
compiler; `official` adds the dense CRF of `--mask_method official`, `eval` the IS / IC-LPIPS
networks of evaluate.py's quality part."""

import importlib

from .errors import UserError

# extra -> [(module to import, pip package)]; pyproject.toml lists the same packages.
EXTRA_MODULES = {
    "official": [("pydensecrf.densecrf", "pydensecrf2")],
    "eval": [("torch_fidelity", "torch-fidelity"), ("lpips", "lpips")],
}


def missing_packages(extra):
    missing = []
    for module, package in EXTRA_MODULES[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def require_extra(extra, what, alternative=""):
    """One line naming the pip command when a package of an optional extra is not installed."""
    missing = missing_packages(extra)
    if missing:
        hint = f"; or {alternative}" if alternative else ""
        raise UserError(f"{what} needs {', '.join(missing)}: pip install {' '.join(missing)} (or pip install '.[{extra}]' in the repository){hint}")
