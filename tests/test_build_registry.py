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


def _dump_top1(args):
    script = os.path.join(ROOT, "scripts", "dump_timm_top1.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60)


def test_dump_timm_top1_writes_the_committed_rows_from_timms_csv(tmp_path):
    """timm's CSV layout back in: only the convnext* rows, both sizes each, as committed."""
    import csv

    with open(os.path.join(ROOT, "scripts", "registry_inputs", "timm_top1.json")) as f:
        committed = json.load(f)
    rows = [(name, m) for name, measured in committed["rows"].items() for m in reversed(measured)]
    rows += [("test_convnext.r160_in1k", rows[0][1]), ("resnet50.a1_in1k", rows[0][1])]
    source = tmp_path / "results-imagenet.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count",
                         "crop_pct", "interpolation"])
        for name, m in rows:
            writer.writerow([name, m["image_size"], f"{m['top1']:.3f}", f"{100 - m['top1']:.3f}", "99.000",
                             "1.000", "1.00", f"{m['crop_pct']:.3f}", m["interpolation"]])
    output = tmp_path / "timm_top1.json"
    result = _dump_top1(["--csv", str(source), "--commit", committed["source"]["commit"], "--output", str(output)])
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text()) == committed

    result = _dump_top1(["--csv", str(source), "--commit", "main", "--output", str(tmp_path / "other.json")])
    assert result.returncode == 2 and "40-digit hex commit; received 'main'" in result.stderr
    assert not (tmp_path / "other.json").exists()
