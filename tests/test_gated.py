"""Gated Hub repos (DINOv3's transformers repos): one-line errors naming HF_TOKEN and the licence page.

The local Hub (tests/hub_server.py) answers a gated repo as huggingface.co
does: 401 GatedRepo without a token, 403 GatedRepo for a token whose account
has not accepted the licence, the files for one that has. The real
huggingface_hub client turns those into `GatedRepoError`.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("huggingface_hub")

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, point_client_at  # noqa: E402

from convnext_zoo import registry, resolve  # noqa: E402
from convnext_zoo.resolve import PresetDownloadError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "convnext_v1_tiny_dinov3_lvd1689m_transformers"
GRANTED = "hf_granted_token"


@pytest.fixture(scope="module")
def server():
    entry = registry.preset_info(NAME)
    with HubServer() as server:
        repo = entry["source"]["hf_repo"]
        server.hub.commit(repo, {entry["source"]["filename"]: b"weights", "config.json": b"{}"})
        server.hub.gate(repo, granted={GRANTED})
        server.repo = repo
        yield server


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    point_client_at(server, tmp_path / "hf_home", monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # A stored login of the machine must not answer for the test.
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no_token"))
    return server


def test_registry_marks_the_gated_repos():
    gated = [n for n in registry.list_presets() if registry.preset_info(n)["gated"]]
    assert gated and all(registry.preset_info(n)["license"] == "dinov3-license" for n in gated)
    assert {registry.preset_info(n)["source"]["hf_repo"] for n in gated} == {
        f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m" for size in ("tiny", "small", "base", "large")}


@pytest.mark.parametrize("handle", [NAME, "hf://facebook/dinov3-convnext-tiny-pretrain-lvd1689m"])
def test_without_token_one_line_names_hf_token_and_licence_page(hub, handle):
    with pytest.raises(PresetDownloadError) as caught:
        resolve.locate(handle)
    message = str(caught.value)
    assert "\n" not in message
    assert "gated" in message and "HF_TOKEN" in message and "No Hugging Face token" in message
    assert f"{hub.url}/{hub.repo}" in message  # the page where the licence is accepted
    if handle == NAME:
        assert "dinov3-license" in message
    # The client asked the server and got the Hub's gated answer.
    assert any(r["path"].startswith(f"/{hub.repo}/") for r in hub.hub.requests)


def test_token_without_access_says_so(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(PresetDownloadError, match=r"has not been granted access.*HF_TOKEN"):
        resolve.locate(NAME)


def test_granted_token_downloads(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    located = resolve.locate(NAME)
    with open(os.path.join(located.path, "model.safetensors"), "rb") as f:
        assert f.read() == b"weights"
    sent = [r["headers"].get("authorization") for r in hub.hub.requests if hub.repo in r["path"]]
    assert f"Bearer {GRANTED}" in sent


@pytest.mark.slow  # imports Keras in a fresh interpreter (~20 s on 2 busy cores)
def test_cli_exits_2_with_one_line(server, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf_home"),
               HF_TOKEN_PATH=str(tmp_path / "no_token"), HF_HUB_DISABLE_XET="1", CONVNEXT_ZOO_LIGHT_IMPORT="1")
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "convnext_zoo", "convert", server.repo, str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_TOKEN" in lines[0] and f"{server.url}/{server.repo}" in lines[0], lines
    assert not out.exists()


def test_pin_presets_pins_a_gated_repo_without_token(hub, tmp_path):
    # The Hub keeps a gated repo's metadata public: the pin needs no token.
    import hashlib
    import json
    import shutil

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import pin_presets
    finally:
        sys.path.pop(0)
    copy = tmp_path / "registry.json"
    shutil.copyfile(os.path.join(ROOT, "presets", "registry.json"), copy)
    pin_presets.main(["--registry", str(copy), "--only", NAME])
    with open(copy) as f:
        source = json.load(f)["presets"][NAME]["source"]
    assert source["revision"] == hub.hub.repos[hub.repo]["refs"]["main"]
    assert source["sha256"] == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(PresetDownloadError, match="gated"):  # the file itself stays gated
        resolve.locate(NAME)
