"""The docstring examples of every module run and print what they show (TensorFlow backend).

They are written for a user who has run `import keras, numpy as np, convnext_zoo`;
examples that download weights, need several devices or stand for a step
of a longer program carry `# doctest: +SKIP`.
"""

import doctest
import importlib
import pkgutil

import keras
import numpy as np
import pytest

import convnext_zoo

MODULES = sorted(info.name for info in pkgutil.iter_modules(convnext_zoo.__path__) if info.name != "__main__")


def test_every_module_is_collected():
    # The package's modules with examples, so that a new module is not silently left out.
    assert {"backbone", "fcmae", "layers", "layout", "timm_format", "weights"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing an example writes lands in the checkout
    module = importlib.import_module(f"convnext_zoo.{name}")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"keras": keras, "np": np, "convnext_zoo": convnext_zoo}
    for test in finder.find(module, globs={**vars(module), **globs}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of convnext_zoo.{name} failed (above)"
