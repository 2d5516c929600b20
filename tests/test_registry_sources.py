"""Every registry entry against the facts of its source: the committed dump and live timm.

`scripts/registry_inputs/` holds what `scripts/dump_registry_inputs.py` read
from timm, transformers and open_clip; the registry is generated from it.
These tests check each entry against that dump (always) and against the
installed timm itself (name, classes, input and test size, crop,
interpolation, mean/std, licence, model arguments, parameter count), so a
wrong mapping in the generator or a stale dump both fail.
"""

import json
import os
import sys

import pytest

from convnext_zoo import registry
from convnext_zoo.class_names import class_names
from convnext_zoo.variants import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = os.path.join(ROOT, "scripts", "registry_inputs")
OFFICIAL_V1_TAGS = {"fb_in1k": "in1k", "fb_in22k": "in22k", "fb_in22k_ft_in1k": "in22k_ft_in1k",
                    "fb_in22k_ft_in1k_384": "in22k_ft_in1k_384"}
# timm's names of the architecture options, and ours.
STEMS = {"overlap": "overlap", "overlap_tiered": "overlap_tiered", "overlap_act": "overlap_act"}
NORMS = {"simplenorm": "simple_norm", "rmsnorm2d": "rms_norm"}


def _load(name):
    with open(os.path.join(INPUTS, name)) as f:
        return json.load(f)


DUMP = _load("timm_pretrained_cfgs.json")
EXTRA = _load("extra_sources.json")


def registered_name(timm_name):
    """Our name of a timm checkpoint: convnext_{v1,v2}_{timm arch}_{timm tag} (official V1 tags shortened)."""
    arch, tag = timm_name.split(".", 1)
    if arch.startswith("convnextv2_"):
        return f"convnext_v2_{arch[len('convnextv2_'):]}_{tag}"
    return f"convnext_v1_{arch[len('convnext_'):]}_{OFFICIAL_V1_TAGS.get(tag, tag)}"


def is_official(timm_name):
    return timm_name.startswith("convnextv2_") or timm_name.split(".", 1)[1] in OFFICIAL_V1_TAGS


def check_against_cfg(entry, cfg):
    """The entry states what timm's pretrained config states."""
    prep = entry["preprocessing"]
    assert entry["source"]["hf_repo"] == cfg["hf_hub_id"].rstrip("/")
    assert entry["num_classes"] == (cfg.get("num_classes") or 0)
    assert entry["image_size"] == cfg["input_size"][1] == cfg["input_size"][2] == prep["image_size"]
    assert entry["test_time"]["image_size"] == (cfg.get("test_input_size") or cfg["input_size"])[1]
    assert entry["test_time"]["crop_pct"] == (cfg.get("test_crop_pct") or cfg["crop_pct"])
    assert (prep["crop_pct"], prep["crop_mode"], prep["interpolation"]) == (
        cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"])
    assert prep["mean"] == list(cfg["mean"]) and prep["std"] == list(cfg["std"])
    assert entry["license"] == cfg["license"]


def check_architecture(entry, model_args):
    """The entry's architecture is the one timm's model function builds."""
    arch = entry["architecture"]
    table = FAMILIES[entry["family"]].get(entry["variant"])
    depths, dims = (arch["depths"], arch["hidden_dims"]) if "depths" in arch else map(list, table)
    assert (list(depths), list(dims)) == (list(model_args["depths"]), list(model_args["dims"]))
    if is_official(entry["timm_name"]):
        assert arch == {}  # the official checkpoints: the variant table says it all
        return
    expected = {
        "stem": STEMS[model_args["stem_type"]] if "stem_type" in model_args else None,
        "norm_layer": NORMS[model_args["norm_layer"]] if "norm_layer" in model_args else None,
        "norm_epsilon": model_args.get("norm_eps"),
        "conv_mlp": model_args.get("conv_mlp"),
        "head_norm_first": model_args.get("head_norm_first"),
        "head_hidden_size": model_args.get("head_hidden_size"),
    }
    assert {k: arch.get(k) for k in expected} == expected


def test_every_timm_checkpoint_is_registered_as_dumped():
    assert len(DUMP) == 98
    for cfg in DUMP:
        name = registered_name(cfg["timm_name"])
        entry = registry.preset_info(name)
        assert entry["timm_name"] == cfg["timm_name"] and entry["source"]["format"] == "timm", name
        check_against_cfg(entry, cfg)
        check_architecture(entry, cfg["model_args"])
        if not is_official(cfg["timm_name"]):
            assert entry["params"] == cfg["params"], name  # timm's own count
        assert not entry["gated"]


def test_sources_outside_timm_as_dumped():
    for row in EXTRA:
        name = f"convnext_v1_{row['arch']}_{row['tag']}"
        entry = registry.preset_info(name)
        assert entry["source"]["format"] == row["source"] and entry["source"]["hf_repo"] == row["hf_hub_id"]
        assert entry["source"]["filename"] == row["filename"]
        assert (entry["license"], entry["gated"], entry["params"]) == (row["license"], row["gated"], row["params"])
        assert entry["num_classes"] == row["num_classes"] and entry["image_size"] == row["input_size"][1]
    dinov3 = [registry.preset_info(n) for n in registry.list_presets() if "dinov3" in n]
    assert len(dinov3) == 8 and all(e["license"] == "dinov3-license" and e["task"] == "features" for e in dinov3)
    # The same weights in two formats: the transformers copy counts as many parameters as timm's.
    for size in ("tiny", "small", "base", "large"):
        pair = [registry.preset_info(f"convnext_v1_{size}_dinov3_lvd1689m{s}") for s in ("", "_transformers")]
        assert pair[0]["params"] == pair[1]["params"] and pair[1]["gated"] and not pair[0]["gated"]


def test_registry_is_the_47_official_plus_timm_and_others():
    names = registry.list_presets()
    assert len(names) == 106 >= 100
    timm_names = {registry.preset_info(n)["timm_name"] for n in names} - {""}
    assert timm_names == {cfg["timm_name"] for cfg in DUMP}
    official = [n for n in names if registry.preset_info(n)["source"]["format"] == "official"
                or is_official(registry.preset_info(n)["timm_name"] or ".")]
    assert len(official) == 47
    by_license = {}
    for n in names:
        by_license.setdefault(registry.preset_info(n)["license"], []).append(n)
    assert set(by_license) == set(registry.LICENSES)
    # timm's own V1 checkpoints are Apache-2.0, unlike the CC-BY-NC V2 micro models.
    assert "convnext_v1_atto_d2_in1k" in by_license["apache-2.0"]
    assert all(n.startswith("convnext_v2_") for n in by_license["cc-by-nc-4.0"])
    assert {n for n in names if "eupe" in n} == set(by_license["fair-noncommercial-research-license"])


# === Live timm (the test extra installs it) ===

@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def test_live_timm_list_and_configs(timm):
    from timm.models import get_pretrained_cfg

    live = timm.list_pretrained("convnext*")
    registered = {registry.preset_info(n)["timm_name"] for n in registry.list_presets()} - {""}
    assert set(live) == registered, sorted(set(live) ^ registered)
    for timm_name in live:
        cfg = get_pretrained_cfg(timm_name).to_dict()
        check_against_cfg(registry.preset_info(registered_name(timm_name)), cfg)


def test_live_timm_model_arguments_and_parameter_counts(timm):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from dump_registry_inputs import model_args
    finally:
        sys.path.pop(0)
    checked = 0
    for cfg in DUMP:
        entry = registry.preset_info(registered_name(cfg["timm_name"]))
        check_architecture(entry, model_args(cfg["timm_name"].split(".")[0]))
        if is_official(cfg["timm_name"]) or entry["params"] > 60e6:
            continue  # the large ones are compared with the dump above
        with torch.device("meta"):  # no memory, no initialisation
            model = timm.create_model(cfg["timm_name"], pretrained=False)
        assert entry["params"] == sum(p.numel() for p in model.parameters()), entry
        checked += 1
    assert checked >= 20


# === Label sets ===

def test_imagenet_12k_label_set(timm):
    names = class_names("imagenet-12k")
    info = pytest.importorskip("timm.data.imagenet_info").ImageNetInfo("imagenet-12k")
    assert len(names) == 11821 and [s for s, _ in names] == info.label_names()
    assert all(lemmas == info.label_name_to_description(s) for s, lemmas in names)
    synsets = {s for s, _ in names}
    assert len(synsets) == 11821 and synsets < {s for s, _ in class_names("imagenet-22k")}
    entries = [registry.preset_info(n) for n in registry.list_presets()]
    twelve = [e for e in entries if e["label_set"] == "imagenet-12k"]
    assert len(twelve) == 10 and all(e["num_classes"] == 11821 for e in twelve)


def test_decode_predictions_12k():
    import numpy as np

    import convnext_zoo

    scores = np.zeros((1, 11821), "float32")
    scores[0, 5] = 2.0
    synset, lemmas = class_names("imagenet-12k")[5]
    assert convnext_zoo.decode_predictions(scores, top=1) == [[(synset, lemmas.split(",")[0], 2.0)]]


def test_task_and_label_set_agree():
    for name in registry.list_presets():
        entry = registry.preset_info(name)
        if entry["task"] == "classification":
            assert entry["label_set"] and len(class_names(entry["label_set"])) == entry["num_classes"], name
        elif entry["task"] == "embedding":
            assert entry["label_set"] is None and entry["num_classes"] in (512, 640, 768, 1024), name
            assert "clip" in entry["tag"]
        else:
            assert entry["num_classes"] == 0 and entry["label_set"] is None, name


# === Top-1 ===

def test_every_imagenet_1k_classifier_has_its_top1_and_no_other_entry_has_one():
    """Official figure where published, else timm's measurement at the entry's size (timm_top1.json)."""
    measured = _load("timm_top1.json")
    source = measured["source"]
    assert (source["repo"], source["path"]) == ("huggingface/pytorch-image-models", "results/results-imagenet.csv")
    assert len(source["commit"]) == 40 and int(source["commit"], 16) >= 0
    counts = {"official": 0, "timm": 0, None: 0}
    for name in registry.list_presets():
        entry = registry.preset_info(name)
        counts[entry["top1_source"]] += 1
        if entry["label_set"] != "imagenet-1k":
            assert (entry["top1"], entry["top1_source"], entry["top1_image_size"]) == (None, None, None), name
            continue
        assert entry["top1_image_size"] == entry["image_size"], name
        at_size = {m["image_size"]: m["top1"] for m in measured["rows"].get(entry["timm_name"], ())}
        official = entry["source"]["format"] == "official" or is_official(entry["timm_name"])
        if official:
            assert entry["top1_source"] == "official", name
            if entry["timm_name"]:
                # timm re-measured the official checkpoints: the figures agree, so a
                # figure filed under the wrong variant or tag shows up here.
                assert abs(entry["top1"] - at_size[entry["image_size"]]) < 0.1, name
        else:
            assert entry["top1_source"] == "timm" and entry["top1"] == at_size[entry["image_size"]], name
    # The 32 official 1k classifiers timm hosts and the two official-only 384 px files; 26 of timm's.
    assert counts == {"official": 34, "timm": 26, None: 46}


# === Licences on model cards ===

def test_model_card_licence_fields_for_every_registry_licence():
    from convnext_zoo import model_card, readers

    for license, facts in registry.LICENSES.items():
        name = registry.list_presets(license=license)[-1]
        config = readers.registry_config(registry.preset_info(name))
        meta = model_card.metadata(config)
        if facts["hub_id"] == license:  # a licence the Hub lists
            assert meta["license"] == license and "license_name" not in meta
        else:  # the Hub's "other", with the licence's name and text
            assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", license, facts["url"])
    dinov3 = readers.registry_config(registry.preset_info("convnext_v1_tiny_dinov3_lvd1689m"))
    with pytest.raises(ValueError, match="released under dinov3-license.*inherit"):
        model_card.resolve_license(dinov3, "apache-2.0")
    assert model_card.resolve_license(dinov3) == "dinov3-license"
