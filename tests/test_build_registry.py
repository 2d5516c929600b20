"""scripts/build_registry.py rebuilds the committed presets/registry.json from inputs in the repo."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "build_registry.py")
REGISTRY = os.path.join(ROOT, "presets", "registry.json")


def _build(output):
    # Run from elsewhere: the default inputs must not depend on the working directory.
    result = subprocess.run([sys.executable, SCRIPT, "--output", str(output)], cwd=os.path.dirname(output),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Wrote 106 presets and 48 aliases" in result.stdout
    with open(output, "rb") as f:
        return f.read()


def test_default_inputs_are_in_the_repo():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import build_registry
    finally:
        sys.path.pop(0)
    reference = os.path.relpath(build_registry.DEFAULT_REFERENCE, ROOT)
    assert reference == os.path.join("scripts", "registry_inputs", "timm_pretrained_cfgs.json")
    assert os.path.isfile(build_registry.DEFAULT_REFERENCE)


def test_rebuilding_over_the_committed_registry_changes_nothing(tmp_path):
    # Over an existing file the script keeps its pinned revisions and checksums.
    output = tmp_path / "registry.json"
    shutil.copyfile(REGISTRY, output)
    with open(REGISTRY, "rb") as f:
        assert _build(output) == f.read()


def test_fresh_build_equals_the_committed_registry_up_to_pins(tmp_path):
    fresh = json.loads(_build(tmp_path / "registry.json"))
    with open(REGISTRY) as f:
        committed = json.load(f)
    for entry in committed["presets"].values():
        entry["source"]["revision"] = entry["source"]["sha256"] = ""
    assert fresh == committed
