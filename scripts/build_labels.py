"""Writes the ImageNet-1k, -12k and -22k class names shipped with the package.

Source: the synset lists and synset -> lemma table that timm installs as plain
data (`timm/data/_info/`). Output, one class per line in model output order,
"synset<TAB>lemmas" (e.g. "n01440764\ttench, Tinca tinca"):
    convnext_zoo/labels/imagenet1k.txt        1000 lines
    convnext_zoo/labels/imagenet12k.txt.gz    11821 lines (gzip, mtime 0; timm's
        ImageNet-12k subset of ImageNet-22k, the in12k heads' output order)
    convnext_zoo/labels/imagenet22k.txt.gz    21841 lines (gzip, mtime 0)

Usage:
    python scripts/build_labels.py [--timm-info DIR]
"""

import argparse
import gzip
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "convnext_zoo", "labels")


def default_info_dir():
    import timm.data

    return os.path.join(os.path.dirname(timm.data.__file__), "_info")


def read_lines(path):
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timm-info", default=None)
    args = parser.parse_args(argv)
    info = args.timm_info or default_info_dir()
    lemmas = dict(line.split("\t", 1) for line in read_lines(os.path.join(info, "imagenet_synset_to_lemma.txt")))
    os.makedirs(OUTPUT, exist_ok=True)
    for synset_file, out_name, count in (
        ("imagenet_synsets.txt", "imagenet1k.txt", 1000),
        ("imagenet12k_synsets.txt", "imagenet12k.txt.gz", 11821),
        ("imagenet22k_synsets.txt", "imagenet22k.txt.gz", 21841),
    ):
        synsets = read_lines(os.path.join(info, synset_file))
        assert len(synsets) == count, (synset_file, len(synsets))
        text = "".join(f"{s}\t{lemmas[s]}\n" for s in synsets).encode()
        out = os.path.join(OUTPUT, out_name)
        tmp = out + ".tmp"
        with open(tmp, "wb") as f:
            f.write(gzip.compress(text, mtime=0) if out_name.endswith(".gz") else text)
        os.replace(tmp, out)
        print(f"Wrote {count} classes to {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
