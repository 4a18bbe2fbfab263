"""The package imports neither matplotlib nor tqdm (the benchmark suite, which needs them, lives in
benchmarks/): no module of mgpp_kernels imports them, at import time or inside a function.

`sys.modules` alone cannot tell: torch itself imports tqdm (torch.hub) whenever it is installed, and
transformers needs it. So the check runs in a fresh interpreter that records which module asks for
them while every mgpp_kernels module is imported, and reads every import statement of the package.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

FORBIDDEN = ("matplotlib", "tqdm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mgpp_kernels")

IMPORT_EVERY_MODULE = r"""
import builtins, importlib, json, pkgutil, sys

forbidden = set(sys.argv[1:])
found, imported, skipped = [], [], []
original_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    top, package = name.partition(".")[0], importer.partition(".")[0]
    if level == 0 and top in forbidden and package == "mgpp_kernels":
        found.append(f"{importer} imports {name}")
    return original_import(name, globals, locals, fromlist, level)

builtins.__import__ = recording_import
import mgpp_kernels

for module in pkgutil.walk_packages(mgpp_kernels.__path__, "mgpp_kernels."):
    try:
        importlib.import_module(module.name)
    except ImportError as error:  # an optional dependency that is not installed or built here
        if (error.name or "").partition(".")[0] in forbidden:
            found.append(f"{module.name} needs {error.name}")
        skipped.append(f"{module.name}: {error}")
        continue
    imported.append(module.name)
print(json.dumps(dict(found=found, imported=imported, skipped=skipped)))
"""


def test_no_module_imports_matplotlib_or_tqdm():
    run = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE, *FORBIDDEN], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["found"] == [], report["found"]
    for name in ("__main__", "machine", "verify", "workloads"):
        assert f"mgpp_kernels.{name}" in report["imported"], report["skipped"]


def test_no_import_statement_names_matplotlib_or_tqdm():
    offending = []
    for folder, _, files in os.walk(PACKAGE):
        for file_name in files:
            if not file_name.endswith(".py"):
                continue
            path = os.path.join(folder, file_name)
            with open(path, encoding="utf-8") as source:
                tree = ast.parse(source.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                offending += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {name}"
                              for name in names if name.partition(".")[0] in FORBIDDEN]
    assert offending == []
