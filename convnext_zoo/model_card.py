"""Model cards (README.md with Hub YAML metadata) for published presets.

Pure Python: the card is rendered from a preset's `config.json` (see
`convnext_zoo.preset_dir`) plus optional facts (registry top-1, parity
report, base model), so `push_to_hub(..., dry_run=True)` can show it
without Keras.
"""

import json

from convnext_zoo import registry

LICENSES = {"v1": "apache-2.0", "v2": "cc-by-nc-4.0"}
# Licences that models fine-tuned from such weights keep (non-commercial or
# with use terms); any other licence for them is refused.
INHERITED_LICENSES = ("cc-by-nc-4.0", "dinov3-license", "fair-noncommercial-research-license")
DATASETS = {"imagenet-1k": ["imagenet-1k"], "imagenet-12k": ["imagenet-12k"], "imagenet-22k": ["imagenet-21k"]}

CITATIONS = {
    "v1": """@inproceedings{liu2022convnet,
  title={A ConvNet for the 2020s},
  author={Liu, Zhuang and Mao, Hanzi and Wu, Chao-Yuan and Feichtenhofer, Christoph and Darrell, Trevor and Xie, Saining},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2022}
}""",
    "v2": """@inproceedings{woo2023convnext,
  title={ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders},
  author={Woo, Sanghyun and Debnath, Shoubhik and Hu, Ronghang and Chen, Xinlei and Liu, Zhuang and Kweon, In So and Xie, Saining},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}""",
}


def resolve_license(config, license=None):
    """The licence of the weights: the caller's, else the config's, else the family's.

    Every V2 checkpoint (and so every model fine-tuned from one) is
    CC-BY-NC-4.0; a different licence for V2 weights is refused, and so is
    one for weights whose config states a licence in `INHERITED_LICENSES`
    (DINOv3's, EUPE's FAIR research licence).

    Args:
        config: the preset config.
        license: an explicit Hub licence identifier, e.g. "apache-2.0".

    Returns:
        A Hub licence identifier.

    Raises:
        ValueError: a V2 preset with a licence other than cc-by-nc-4.0, or
            another licence for weights under an inherited one.
    """
    chosen = license or config.get("license") or LICENSES[config["family"]]
    if config["family"] == "v2" and chosen != "cc-by-nc-4.0":
        raise ValueError(
            f"ConvNeXt V2 weights are released under cc-by-nc-4.0 and models derived "
            f"from them inherit it. Received: license={chosen!r}. Pass "
            "license='cc-by-nc-4.0' (or leave it unset)."
        )
    stated = config.get("license")
    if stated in INHERITED_LICENSES and chosen != stated:
        raise ValueError(
            f"These weights are released under {stated} and models derived from them "
            f"inherit it. Received: license={chosen!r}. Pass license={stated!r} (or leave it unset)."
        )
    return chosen


def license_metadata(license):
    """The card's licence fields: the Hub identifier, plus name and link for "other" licences."""
    known = registry.LICENSES.get(license)
    if known is None or known["hub_id"] == license:
        return {"license": license}
    return {"license": known["hub_id"], "license_name": license, "license_link": known["url"]}


def _yaml_value(value):
    return json.dumps(value)  # JSON scalars and flow lists are valid YAML


def metadata(config, license=None, base_model=None, name=None):
    """The card's YAML metadata as an ordered dict."""
    label_set = config.get("label_set")
    tags = ["keras", "keras-hub", "convnext", f"convnext-{config['family']}", "image-classification",
            "vision"]
    if (config.get("timm") or {}).get("loadable"):
        tags.insert(2, "timm")
    if config.get("head") == "none":
        tags.append("fcmae")
    meta = {
        "library_name": "keras-hub",
        **license_metadata(resolve_license(config, license)),
        "tags": tags,
        "pipeline_tag": "image-classification" if config.get("head", "fc") == "fc" else "image-feature-extraction",
    }
    datasets = list(DATASETS.get(label_set, []))
    tag = (name or "") + " " + str(config.get("provenance", {}).get("preset", ""))
    if "22k" in tag and "imagenet-21k" not in datasets:
        datasets.insert(0, "imagenet-21k")
    if datasets:
        meta["datasets"] = datasets
    base = base_model or config.get("provenance", {}).get("base_model")
    if base:
        meta["base_model"] = base.removeprefix("hf://")
    return meta


def top1_provenance(entry):
    """Where a registry entry's top-1 comes from, in the card's words."""
    size = entry.get("top1_image_size")
    at = f" at {size} px" if size else ""
    return {
        "official": f"the paper's figure for the source checkpoint{at}",
        "timm": f"timm's measurement of the source checkpoint{at}",
    }.get(entry.get("top1_source"), "reported for the source checkpoint")


def render(config, repo_id, license=None, base_model=None, top1=None, parity=None, name=None,
           top1_source=None):
    """The README.md of a published preset.

    Args:
        config: the preset's `config.json` (dict).
        repo_id: the Hub repo the card is for ("user/name").
        license: overrides the config's licence (see `resolve_license`).
        base_model: the Hub repo (or `hf://` handle) the weights were
            fine-tuned from; adds `base_model` to the metadata.
        top1: ImageNet-1k top-1 accuracy (percent), when known.
        parity: a `convnext_zoo.verify` report, when known.
        name: the registry name, when the preset is a registered one.
        top1_source: where `top1` comes from, in words (default "reported
            for the source checkpoint"; `top1_provenance` words a registry
            entry's).

    Returns:
        The card text (YAML front matter + Markdown body).

    Example:
        >>> card = render(config, "me/convnext-v2-atto")  # doctest: +SKIP
    """
    meta = metadata(config, license, base_model, name)
    front = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            front.append(f"{key}:")
            front.extend(f"- {_yaml_value(item)}" for item in value)
        else:
            front.append(f"{key}: {_yaml_value(value)}")
    front.append("---")

    family, variant = config["family"], config["variant"]
    title = f"ConvNeXt {family.upper()}-{variant}" + (f" ({name})" if name else "")
    head = config.get("head", "fc")
    what = {
        "fc": f"an image classifier over {config['num_classes']} classes"
        + (f" ({config['label_set']})" if config.get("label_set") else ""),
        "norm": "a feature extractor (pooled, normalised embedding; no classification layer)",
        "none": "a self-supervised FCMAE encoder (backbone only, no head)",
    }[head]
    prep = config["preprocessing"]
    provenance = config.get("provenance", {})
    timm_loadable = bool((config.get("timm") or {}).get("loadable"))
    body = [
        f"# {title}",
        "",
        f"Weights of ConvNeXt {family.upper()}-{variant}, {what}, as a convnext_zoo preset "
        "(`config.json` + `model.safetensors`) for Keras 3 / keras-hub"
        + (", stored in timm's layout so timm loads it too." if timm_loadable else "."),
        "",
        "## Usage",
        "",
        "```python",
        "import convnext_zoo",
        "",
        f'model = convnext_zoo.from_preset("hf://{repo_id}")',
    ]
    if head == "fc":
        body += [
            "# Raw uint8 RGB images of any size: the preset's preprocessing is attached.",
            "scores = model.predict(images)",
        ]
        if config.get("label_set"):
            body.append("print(convnext_zoo.decode_predictions(scores, top=5))")
    else:
        body.append(f'features = convnext_zoo.from_preset("hf://{repo_id}", include_top=False)')
    body += ["```", ""]
    if timm_loadable:
        body += [
            "In PyTorch:",
            "",
            "```python",
            "import timm",
            "",
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
            "```",
            "",
        ]
    body += [
        "Command line: `convnext-zoo predict photo.jpg --preset hf://" + repo_id + "`.",
        "",
        "## Details",
        "",
        f"- Architecture: ConvNeXt {family.upper()}-{variant}" + (" (GRN, no layer scale)" if family == "v2" else " (layer scale)"),
        f"- Training resolution: {config['image_size'][0]}x{config['image_size'][1]}",
        f"- Preprocessing: {prep['interpolation']} resize, crop_pct {prep['crop_pct']} "
        f"({prep['crop_mode']}), mean {prep['mean']}, std {prep['std']}",
        f"- Weights: {config.get('weights_dtype', 'float32')} safetensors",
        f"- Licence: {meta['license']}",
        f"- Converted from: {provenance.get('source', provenance.get('preset', provenance.get('file_name', 'a Keras model')))}"
        f" ({provenance.get('source_format', 'keras')} layout)",
    ]
    if meta.get("base_model"):
        body.append(f"- Fine-tuned from: [{meta['base_model']}](https://huggingface.co/{meta['base_model']})")
    if top1 is not None or parity:
        body += ["", "## Results", ""]
        if top1 is not None:
            body.append(f"- ImageNet-1k top-1 ({top1_source or 'reported for the source checkpoint'}): {top1:.1f}%")
        if parity:
            body.append(
                f"- Parity with the source implementation ({parity.get('reference', 'reference')}) "
                f"on {parity.get('images', '?')} images: logits max relative difference "
                f"{_number(parity.get('logits_relative'))}, features {_number(parity.get('features_relative'))}"
                + (f", embedding {_number(parity['embedding_relative'])}"
                   if parity.get("embedding_relative") is not None else "")
                + (f", top-1 agreement {parity['top1_agreement']:.0%}" if parity.get("top1_agreement") is not None else "")
            )
    body += ["", "## Citation", "", "```bibtex", CITATIONS[family], "```", ""]
    return "\n".join(front + [""] + body)


def _number(value):
    return "n/a" if value is None else f"{value:.1e}"


def parse_front_matter(text):
    """Reads the flat YAML front matter written by `render` (for tests and checks)."""
    lines = text.splitlines()
    if not lines or lines[0] != "---":
        return {}
    meta, key = {}, None
    for line in lines[1:]:
        if line == "---":
            break
        if line.startswith("- ") and key:
            meta.setdefault(key, []).append(json.loads(line[2:]))
        else:
            key, _, value = line.partition(":")
            value = value.strip()
            if value:
                meta[key] = json.loads(value)
    return meta
