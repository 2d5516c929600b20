"""The preset registry: schema, names, aliases, sources, parameter counts, packaging."""

import json
import os
import subprocess
import sys

import pytest

from convnext_zoo import registry

# Reference table (convnext.md §1): params with a 1000-class head; V1 22k heads.
TABLE = {
    ("v2", "atto"): 3708400, ("v2", "femto"): 5233240, ("v2", "pico"): 9066280,
    ("v2", "nano"): 15623800, ("v1", "tiny"): 28589128, ("v2", "tiny"): 28635496,
    ("v1", "small"): 50223688, ("v1", "base"): 88591464, ("v2", "base"): 88717800,
    ("v1", "large"): 197767336, ("v2", "large"): 197956840, ("v1", "xlarge"): 350196968,
    ("v2", "huge"): 660289640,
}
TABLE_22K = {"tiny": 44615857, "small": 66250417, "base": 109953489, "large": 229799953,
             "xlarge": 392900177}


def official(entry):
    """The 47 checkpoints the ConvNeXt authors released (timm's `fb_*` and V2 tags, two .pth files)."""
    return entry["source"]["format"] == "official" or entry["family"] == "v2" or (
        entry["timm_name"].split(".")[-1].startswith("fb_"))


def entries(only_official=True):
    pairs = [(name, registry.preset_info(name)) for name in registry.list_presets()]
    return [(n, e) for n, e in pairs if official(e) or not only_official]


def test_presets_all_valid():
    assert len(registry.list_presets()) == 106 and len(entries()) == 47
    assert len(registry.list_presets("v1")) == 80 and len(registry.list_presets("v2")) == 26
    for name, entry in entries(only_official=False):
        entry.pop("name")
        assert registry.validate_entry(name, entry) == [], name


def test_validation_catches_wrong_entries():
    entry = registry.preset_info("convnext_v1_atto_ols_a2_in1k")
    entry.pop("name")
    for key, value, problem in [
        ("license", "cc-by-4.0", "license"), ("task", "embedding", "task"),
        ("label_set", "imagenet-22k", "label_set"), ("architecture", {"stem_kind": "x"}, "architecture keys"),
        ("architecture", {"depths": [2, 2, 6, 2]}, "together"), ("gated", "yes", "'gated' has type"),
        ("timm_name", "convnext_atto.d2_in1k", "timm source repo"),
    ]:
        broken = dict(entry, **{key: value})
        assert any(problem in p for p in registry.validate_entry("convnext_v1_atto_ols_a2_in1k", broken)), key
    v2 = registry.preset_info("convnext_v2_atto_fcmae")
    v2.pop("name")
    assert registry.validate_entry("convnext_v2_atto_fcmae", dict(v2, license="apache-2.0"))


def test_sources_match_family_variant_tag():
    for name, entry in entries():
        source = entry["source"]
        assert source["revision"] == "" and source["sha256"] == ""  # pinned online only
        if entry["tag"] == "in1k_384":
            assert source["format"] == "official" and not source["hf_repo"]
            assert source["official_url"].endswith(f"convnext_{entry['variant']}_1k_384.pth")
            continue
        arch = "convnextv2" if entry["family"] == "v2" else "convnext"
        tag = entry["tag"] if entry["family"] == "v2" else "fb_" + entry["tag"]
        assert source["hf_repo"] == f"timm/{arch}_{entry['variant']}.{tag}", name
        size = int(entry["tag"].rsplit("_", 1)[1]) if entry["tag"][-3:] in ("384", "512") else 224
        assert entry["image_size"] == size, name
        squash = size >= 384
        assert entry["preprocessing"]["crop_mode"] == ("squash" if squash else "center")
        assert entry["preprocessing"]["crop_pct"] == (1.0 if squash else 0.875)


def test_parameter_counts_match_reference_table():
    for name, entry in entries():
        key = (entry["family"], entry["variant"])
        if entry["num_classes"] == 1000:
            assert entry["params"] == TABLE[key], name
        elif entry["num_classes"] == 21841:
            assert entry["params"] == TABLE_22K[entry["variant"]], name
        else:  # FCMAE: the bare backbone (no head LayerNorm, no Dense)
            dims = {"atto": 320, "femto": 384, "pico": 512, "nano": 640, "tiny": 768,
                    "base": 1024, "large": 1536, "huge": 2816}[entry["variant"]]
            assert entry["params"] == TABLE[key] - 1002 * dims - 1000, name


def test_aliases():
    aliases = registry.aliases()
    assert len(aliases) == 48
    # timm's own variants: the one checkpoint trained on ImageNet-1k alone.
    assert aliases["convnext_v1_atto"] == aliases["convnext_v1_atto_imagenet"] == "convnext_v1_atto_d2_in1k"
    assert aliases["convnext_v1_nano"] == "convnext_v1_nano_d1h_in1k"
    assert "convnext_v1_large_mlp" not in aliases and "convnext_v1_xxlarge" not in aliases
    assert aliases["convnext_v2_atto_imagenet"] == "convnext_v2_atto_fcmae_ft_in1k"
    assert aliases["convnext_v1_base"] == "convnext_v1_base_in1k"
    assert aliases["convnext_v1_xlarge_imagenet"] == "convnext_v1_xlarge_in22k_ft_in1k"
    assert registry.preset_info("convnext_v1_tiny")["name"] == "convnext_v1_tiny_in1k"


def test_resolution_and_errors(tmp_path):
    assert registry.resolve("convnext_v2_atto").kind == "registered"
    hf = registry.resolve("hf://timm/convnextv2_atto.fcmae@abc1234")
    assert (hf.kind, hf.repo_id, hf.revision) == ("hf", "timm/convnextv2_atto.fcmae", "abc1234")
    assert registry.resolve(str(tmp_path)).kind == "local"
    with pytest.raises(ValueError, match=r"Did you mean 'convnext_v1_tiny'.*hf://org/repo.*local directory"):
        registry.resolve("convnext_v1_tinyy")
    with pytest.raises(ValueError, match=r"hf://org/repo"):
        registry.resolve("hf://only-one-part")
    with pytest.raises(ValueError, match="must be a directory"):
        (tmp_path / "f.bin").write_bytes(b"")
        registry.resolve(str(tmp_path / "f.bin"))
    with pytest.raises(ValueError, match="Unknown preset"):
        registry.preset_info("nope")


def test_light_import_lists_presets_without_keras():
    # The command line's mode (CONVNEXT_ZOO_LIGHT_IMPORT=1): the registry is
    # pure Python. A plain `import convnext_zoo` loads Keras on purpose, so
    # that saved models deserialize after a bare import.
    code = ("import sys, convnext_zoo as c; n = len(c.list_presets()); "
            "print(n, any(m in sys.modules for m in ('keras', 'tensorflow', 'huggingface_hub')))")
    env = dict(os.environ, CONVNEXT_ZOO_LIGHT_IMPORT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.split() == ["106", "False"], out.stderr
    env["CONVNEXT_ZOO_LIGHT_IMPORT"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.split() == ["106", "True"], out.stderr


OFFICIAL = [name for name, _ in entries()]
SMALL = [n for n in OFFICIAL if registry.preset_info(n)["variant"] in ("atto", "femto", "pico", "nano", "tiny")]
LARGE = [n for n in OFFICIAL if n not in SMALL]


def _check_build(name, input_shape):
    import convnext_zoo

    entry = registry.preset_info(name)
    model = convnext_zoo.from_preset(name, load_weights=False, input_shape=input_shape)
    assert model.count_params() == entry["params"], name
    expected = "ConvNeXtBackbone" if entry["num_classes"] == 0 else "ConvNeXtImageClassifier"
    assert type(model).__name__ == expected
    if entry["num_classes"]:
        assert model.output.shape[-1] == entry["num_classes"]
        assert model.preprocessor.image_converter.image_size == (input_shape[0],) * 2


def _architecture_signature(entry):
    arch = entry["architecture"]
    return (tuple(sorted(k for k in arch if k not in ("depths", "hidden_dims"))), arch.get("stem"),
            entry["num_classes"] > 0, entry["label_set"])


# timm's own checkpoints, DINOv3, EUPE: one small representative per architecture and head.
NEW_SMALL = list({_architecture_signature(e): n for n, e in reversed(entries(only_official=False))
                  if not official(e) and e["params"] <= 30e6
                  and (e["architecture"] or e["label_set"] != "imagenet-1k")}.values())


def test_every_entry_has_a_valid_preset_config():
    from convnext_zoo import preset_dir, readers, variants

    for name, entry in entries(only_official=False):
        arch = entry["architecture"]
        unsupported = set(arch) - {"depths", "hidden_dims"} - set(preset_dir.DEFAULTS)
        if unsupported:  # an option this build cannot express is refused, never dropped
            with pytest.raises(readers.ConversionError, match=sorted(unsupported)[0]):
                readers.registry_config(entry)
            continue
        config = readers.registry_config(entry)  # validated by preset_dir
        if entry["variant"] in variants.FAMILIES[entry["family"]]:
            assert config["variant"] == entry["variant"], name
        elif "depths" in arch:
            expected = variants.named_variant(entry["family"], arch["depths"], arch["hidden_dims"])
            assert config["variant"] == expected, name  # large_mlp -> large; atto -> custom
            if expected == variants.CUSTOM:
                assert (config["depths"], config["hidden_dims"]) == (arch["depths"], arch["hidden_dims"])
        for key in set(arch) - {"depths", "hidden_dims"} | {"stem", "norm_layer", "norm_epsilon", "conv_mlp"}:
            assert config[key] == arch.get(key, preset_dir.DEFAULTS[key]), (name, key)
        assert config["head"] == ("fc" if entry["num_classes"] else "none" if entry["family"] == "v2"
                                  else "norm"), name
    assert readers.registry_config(registry.preset_info("convnext_v1_xxlarge_clip_laion2b_soup"))[
        "norm_epsilon"] == 1e-5


def _build_new(name, monkeypatch):
    """Builds a registered timm / DINOv3 / CLIP preset without weights; checks it against its entry."""
    import convnext_zoo

    from convnext_zoo import preset_dir, readers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = registry.preset_info(name)
    if set(entry["architecture"]) - {"depths", "hidden_dims"} - set(preset_dir.DEFAULTS):
        with pytest.raises(readers.ConversionError, match="cannot build"):
            convnext_zoo.from_preset(name, load_weights=False, input_shape=(64, 64, 3))
        return
    model = convnext_zoo.from_preset(name, load_weights=False, input_shape=(64, 64, 3))
    assert model.count_params() == entry["params"], name  # timm's count, from the dump
    backbone = getattr(model, "backbone", model)
    for key, default in (("stem", "patchify"), ("norm_layer", "layer_norm"), ("conv_mlp", False)):
        assert getattr(backbone, key) == entry["architecture"].get(key, default), (name, key)
    if entry["num_classes"]:
        assert model.output.shape[-1] == entry["num_classes"]
    return model


@pytest.mark.parametrize("name", NEW_SMALL)
def test_new_small_presets_build_offline_with_timms_parameter_count(name, monkeypatch):
    _build_new(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_v1_xxlarge_clip_laion2b_soup",  # custom depths, epsilon 1e-5
                                  "convnext_v1_large_mlp_clip_laion2b_augreg"])  # head MLP
def test_heavy_new_architectures_build_offline(name, monkeypatch):
    model = _build_new(name, monkeypatch)
    if model is not None and name.startswith("convnext_v1_xxlarge"):
        assert model.backbone.norm_epsilon == 1e-5 and tuple(model.backbone.depths) == (3, 4, 30, 3)


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_build_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _check_build(name, (64, 64, 3))


def _architecture_groups(names):
    """Presets grouped by the network their config builds (metadata left out).

    Many registered checkpoints share one network (a 224 px and a 384 px fine-tune,
    an EMA and a plain file): building each network once checks every entry's
    parameter count and head while building up to 660M parameters a third as often.
    """
    from convnext_zoo import readers

    metadata = {"image_size", "preprocessing", "label_set", "license", "provenance", "class_names"}
    groups = {}
    for name in names:
        config = readers.registry_config(registry.preset_info(name))
        key = json.dumps({k: v for k, v in config.items() if k not in metadata}, sort_keys=True)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


@pytest.mark.slow
@pytest.mark.parametrize("names", _architecture_groups(LARGE), ids=lambda names: names[0])
def test_large_presets_build_offline(names, monkeypatch):
    import convnext_zoo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = convnext_zoo.from_preset(names[0], load_weights=False, input_shape=(64, 64, 3))
    for name in names:
        entry = registry.preset_info(name)
        assert model.count_params() == entry["params"], name
        expected = "ConvNeXtBackbone" if entry["num_classes"] == 0 else "ConvNeXtImageClassifier"
        assert type(model).__name__ == expected, name
        if entry["num_classes"]:
            assert model.output.shape[-1] == entry["num_classes"], name


@pytest.mark.slow
def test_wheel_lists_presets_in_fresh_venv(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(tmp_path / "dist"), root], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("convnext_zoo-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    code = ("import importlib.resources as r, convnext_zoo as c; "
            "labels = sorted(p.name for p in (r.files('convnext_zoo') / 'labels').iterdir()); "
            "print(len(c.list_presets()), c.preset_info('convnext_v2_atto')['params'], *labels)")
    # Installed without dependencies: read the shipped data in the light
    # (command line) import mode, which does not load Keras.
    env = dict(os.environ, CONVNEXT_ZOO_LIGHT_IMPORT="1")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                         timeout=120, env=env)
    assert out.stdout.split() == ["106", "3708400", "imagenet12k.txt.gz", "imagenet1k.txt",
                                  "imagenet22k.txt.gz"], out.stderr


def test_list_presets_filters():
    apache = registry.list_presets(license="apache-2.0")
    assert apache and all(registry.preset_info(n)["license"] == "apache-2.0" for n in apache)
    small = registry.list_presets(license="apache-2.0", task="classification", max_params="30M")
    assert set(small) == {n for n in apache if registry.preset_info(n)["task"] == "classification"
                          and registry.preset_info(n)["params"] <= 30_000_000}
    assert registry.list_presets(max_params=30_000_000) == registry.list_presets(max_params="30m")
    assert len(registry.list_presets(max_params="3.5M")) == 3  # zepto_rms, its _ols stem, the V2 atto encoder
    features = registry.list_presets("v2", task="features")
    assert len(features) == 8 and all(n.endswith("_fcmae") for n in features)
    assert registry.parse_params("1.5B") == 1_500_000_000 and registry.parse_params(800) == 800
    assert registry.list_presets(license="MIT") == registry.list_presets(license="mit")
    for kwargs, fragment in [({"license": "apache"}, "Did you mean 'apache-2.0'"),
                             ({"task": "embeddings"}, "Valid: classification"),
                             ({"max_params": "-3M"}, "max_params='-3M'"), ({"max_params": True}, "positive int")]:
        with pytest.raises(ValueError, match=fragment):
            registry.list_presets(**kwargs)
