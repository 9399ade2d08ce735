"""The GPU machine's package set on any machine: hide every installed distribution that is neither on the
GPU image (bench/gpu/image-packages.txt) nor among the wheels a GPU run carries (bench/gpu/wheels.txt).

tests/test_gpu_run.py runs the GPU command's dry run with this guard in every process (the run and the
ComfyUI server it starts: a ``sitecustomize`` on ``PYTHONPATH`` calls :func:`install`), so that an import
the GPU machine could not satisfy fails here as it would there, or takes the fallback it would take there.
The CI environment only names things: which distribution a top-level module belongs to; what may be
imported comes from the two lists alone.

Standard-library modules pass (less those Python 3.12 removed: the GPU machine runs 3.12), and so does
anything under the ``local`` roots (the checkout and ComfyUI's tree, which travel). Any other top-level
module is looked up by the distribution that installed it: an allowed one passes and is recorded as
used, any other is hidden (``importlib.util.find_spec`` says None, ``import`` raises ModuleNotFoundError,
``importlib.metadata`` does not list it) and recorded as blocked. Each decision is appended to
``report``/``<pid>.jsonl`` at once, so a process that is killed leaves its record.

Configuration: the environment variable COMFY_TURBO_IMAGE_GUARD names a JSON file
``{"allowed": [distribution names], "local": [directories], "report": directory}``. Standard library only.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import os
import re
import sys
import sysconfig

ENV = "COMFY_TURBO_IMAGE_GUARD"
REMOVED_IN_312 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


# The GPU machine's interpreter, for requirement markers (Python 3.12 on x86-64 Linux).
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
               "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "os_name": "posix", "platform_release": "", "platform_version": "", "extra": ""}


def _packaging():
    try:
        from packaging.requirements import Requirement
    except ImportError:                                   # pip's own copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def requirements(requires: list[str] | None) -> list[str]:
    """The names a distribution's ``Requires-Dist`` lines need on the GPU machine (no extras)."""
    Requirement = _packaging()
    names = []
    for line in requires or ():
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(GPU_MARKERS):
            names.append(normalize(req.name))
    return names


def installed_closure(names) -> dict[str, str]:
    """``names`` and, through the distributions installed here, everything they require on the GPU machine:
    {name: the name that brought it in}. A name not installed here adds nothing further."""
    found = {normalize(n): normalize(n) for n in names}
    todo = list(found)
    while todo:
        name = todo.pop()
        try:
            requires = importlib.metadata.distribution(name).requires
        except importlib.metadata.PackageNotFoundError:
            continue
        for need in requirements(requires):
            if need not in found:
                found[need] = name
                todo.append(need)
    return found


def read_names(path) -> list[str]:
    """Distribution names of a list file: one a line, ``name`` or ``name==version``, ``#`` comments."""
    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(normalize(re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0]))
    return names


class ImageGuard:
    """Stands in for ``importlib.machinery.PathFinder`` on ``sys.meta_path``."""

    def __init__(self, allowed, local, report):
        self.allowed = {normalize(n) for n in allowed}
        self.local = [os.path.realpath(p) + os.sep for p in local]
        paths = sysconfig.get_paths()
        self.stdlib = [os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib")]
        self.report = os.path.join(report, f"{os.getpid()}.jsonl") if report else None
        self.decided: dict[str, bool] = {}
        self.providers: dict[str, set] = {}           # top-level module -> distributions that install it
        for dist in importlib.metadata.distributions():
            name = normalize(dist.metadata["Name"] or "")
            for top in (dist.read_text("top_level.txt") or "").split():
                self.providers.setdefault(top, set()).add(name)
            for file in dist.files or ():
                parts = file.parts
                if parts and not parts[0].endswith((".dist-info", ".egg-info", ".data")) and parts[0] != "..":
                    top = parts[0].split(".", 1)[0] if len(parts) == 1 else parts[0]
                    if len(parts) > 1 or parts[0].endswith((".py", ".so", ".pyd")):
                        self.providers.setdefault(top, set()).add(name)

    def _record(self, kind: str, module: str, detail) -> None:
        if self.report is None:
            return
        with open(self.report, "a") as f:
            f.write(json.dumps({"kind": kind, "module": module, "detail": detail, "argv": sys.argv[:2]}) + "\n")

    def _allowed(self, name: str, spec) -> bool:
        if name in REMOVED_IN_312:
            self._record("blocked", name, "removed in Python 3.12")
            return False
        if name in sys.builtin_module_names or name in getattr(sys, "stdlib_module_names", ()):
            return True
        origin = spec.origin if spec.origin not in (None, "namespace") else next(
            iter(spec.submodule_search_locations or ()), None)
        where = os.path.realpath(origin) if origin else ""
        if any(where.startswith(root) for root in self.local):
            return True
        if any(where.startswith(root) for root in self.stdlib) and "site-packages" not in where:
            return True
        providers = self.providers.get(name, set())
        allowed = sorted(providers & self.allowed)
        if allowed:
            self._record("used", name, allowed[0])
            return True
        self._record("blocked", name, sorted(providers) or f"no distribution installs it ({where})")
        return False

    # -- the PathFinder interface ------------------------------------------------------------------
    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or path is not None or "." in name:
            return spec                              # submodules belong to their top-level package
        if name not in self.decided:
            self.decided[name] = self._allowed(name, spec)
        return spec if self.decided[name] else None

    def find_distributions(self, *args, **kwargs):
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if normalize(dist.metadata["Name"] or "") in self.allowed:
                yield dist

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()


def install(config_path: str | None = None) -> ImageGuard | None:
    """Put the guard in PathFinder's place on ``sys.meta_path`` (once), configured by ``config_path`` or
    the COMFY_TURBO_IMAGE_GUARD file; without either, do nothing."""
    config_path = config_path or os.environ.get(ENV)
    if not config_path:
        return None
    for finder in sys.meta_path:
        if isinstance(finder, ImageGuard):
            return finder
    with open(config_path) as f:
        config = json.load(f)
    guard = ImageGuard(config["allowed"], config.get("local", ()), config.get("report"))
    sys.meta_path[:] = [guard if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    # Modules the interpreter imported before the guard (site, encodings) are standard library or site's own.
    return guard
