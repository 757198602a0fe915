"""docs/errors.md names every exception class the packages define (issue 11: one page that
says, for every user-facing error, when it is raised and what to do)."""
import ast
import os

from tests.support.inputs import REPO

PACKAGES = ("cad_spconv", "adapters", "cad_apps")


def exception_classes():
    found = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                tree = ast.parse(open(path, encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ClassDef) and any(
                            isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception"))
                                                         or b.id in ("ValueError", "TypeError"))
                            for b in node.bases):
                        found[node.name] = os.path.relpath(path, REPO)
    return found


def test_every_exception_class_is_documented():
    doc = open(os.path.join(REPO, "docs", "errors.md"), encoding="utf-8").read()
    classes = exception_classes()
    assert {"UnsupportedModelError", "SpconvUnavailable", "EngineUnsupported",
            "OutputBusyError", "CheckpointMismatchError"} <= set(classes)
    missing = {name: path for name, path in classes.items() if f"`{name}`" not in doc
               and f".{name}`" not in doc}
    assert not missing, f"docs/errors.md does not describe {missing}"
