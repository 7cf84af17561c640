"""Load one of the repository's scripts (examples/, benchmarks/, tests/scripts/) as a module, for tests that call
its functions in-process."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The script at ``ROOT/relative_path``, executed as module ``repo_script_<stem>`` (registered in
    ``sys.modules``: dataclasses look their module up there)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"repo_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
