"""A local stand-in for the Hugging Face Hub's download API, for offline tests.

Speaks the part of the Hub HTTP API that `huggingface_hub` 2.x uses to
download files and read repo metadata:

    HEAD/GET /{org}/{name}/resolve/{revision}/{path}     file (Range supported)
    GET /api/models/{org}/{name}[/revision/{revision}]   repo info (sha, siblings)
    GET /api/models/{org}/{name}/tree/{revision}[/path]  file listing

and the upload API (with HF_HUB_DISABLE_XET=1): POST /api/repos/create,
POST /api/models/{repo}/preupload/{rev}, POST /{repo}.git/info/lfs/objects/batch,
PUT /lfs-upload/{oid} (the "basic" transfer), POST /api/models/{repo}/commit/{rev}
(NDJSON; `?create_pr=1` opens refs/pr/N), POST /api/models/{repo}/branch/{name}.
Uploaded files are then served by the download routes.

Responses carry the headers the client reads: `X-Repo-Commit`, `ETag` (the
sha256 for LFS-like files, a git blob id otherwise), `Content-Length`,
`Accept-Ranges`; errors carry `X-Error-Code` (RepoNotFound, EntryNotFound,
RevisionNotFound, GatedRepo) as the real Hub does. Private repos need
`Authorization: Bearer <token>`. A gated repo (`FakeHub.gate`) answers as the
Hub does for a licence that must be accepted first: its info and file list
are public; a file request gets 401 GatedRepo without a token, 403 GatedRepo
for a token whose user has not accepted it, the file for a granted token.

Extending (e.g. upload endpoints): subclass `HubHandler`, add
`(method, regex, handler_name)` tuples to `ROUTES`, and use `FakeHub.commit`
to store files. Every request is appended to `FakeHub.requests`.

Example:
    with HubServer() as server:
        server.hub.commit("timm/x", {"config.json": b"{}"})
        os.environ["HF_ENDPOINT"] = server.url   # before importing huggingface_hub
"""

import base64
import email.utils
import hashlib
import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".h5", ".keras", ".npz")


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """In-memory repos: each has commits (sha -> {path: bytes}) and refs."""

    def __init__(self):
        self.repos = {}
        self.requests = []
        # (repo_id, path) -> {"cut_after": n bytes} and/or {"serve": bytes},
        # optionally {"times": k} to fire k times only.
        self.faults = {}
        self.lock = threading.Lock()
        self.lfs = {}  # uploaded LFS objects: sha256 -> bytes
        self.commit_messages = []  # (repo_id, branch, summary) of uploaded commits
        self.validated_yaml = []  # model card metadata sent to /api/validate-yaml
        self.gated = {}  # repo_id -> tokens granted access (users who accepted the licence)

    def gate(self, repo_id, granted=()):
        """Makes `repo_id` gated; `granted` tokens may read it."""
        with self.lock:
            self.gated[repo_id] = set(granted)

    def commit(self, repo_id, files, message="commit", branch="main", private=False):
        """Adds or replaces `files` on `branch`; returns the new commit sha."""
        with self.lock:
            repo = self.repos.setdefault(
                repo_id, {"commits": {}, "refs": {}, "private": private, "order": []}
            )
            parent = repo["refs"].get(branch)
            tree = dict(repo["commits"][parent]) if parent else {}
            tree.update({path: bytes(data) for path, data in files.items()})
            sha = hashlib.sha1(
                f"{repo_id}{parent}{message}{len(repo['order'])}{time.time()}".encode()
            ).hexdigest()
            repo["commits"][sha] = tree
            repo["refs"][branch] = sha
            repo["order"].append(sha)
            return sha

    def resolve(self, repo_id, revision):
        """Returns `(sha, tree)`, or `None` for an unknown revision."""
        repo = self.repos[repo_id]
        revision = revision or "main"
        if revision in repo["refs"]:
            revision = repo["refs"][revision]
        matches = [sha for sha in repo["commits"] if sha.startswith(revision)] if len(revision) >= 7 else []
        if revision in repo["commits"]:
            return revision, repo["commits"][revision]
        if len(matches) == 1:
            return matches[0], repo["commits"][matches[0]]
        return None

    @staticmethod
    def etag(path, data):
        if path.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return git_blob_id(data)


class HubHandler(BaseHTTPRequestHandler):
    """Routes requests to methods; subclass and extend `ROUTES` to add endpoints."""

    protocol_version = "HTTP/1.1"
    REPO = r"(?P<repo>[^/]+/[^/]+)"
    ROUTES = [
        ("HEAD", rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve_file"),
        ("GET", rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve_file"),
        ("GET", rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "repo_tree"),
        ("GET", rf"^/api/models/{REPO}/revision/(?P<rev>[^/]+)$", "repo_info"),
        ("GET", rf"^/api/models/{REPO}$", "repo_info"),
        # Uploads (huggingface_hub 2.x with HF_HUB_DISABLE_XET=1).
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("POST", rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/{REPO}\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
        ("POST", rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$", "commit"),
        ("POST", rf"^/api/models/{REPO}/branch/(?P<branch>[^/]+)$", "create_branch"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ]

    @property
    def hub(self):
        return self.server.hub

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # === Dispatch ===

    def setup(self):
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self):
        super().finish()
        self.server.connections.discard(self.connection)

    def _dispatch(self, method):
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        self.hub.requests.append(
            {"method": method, "path": url.path,
             # Header names are case-insensitive; clients differ in case.
             "headers": {k.lower(): v for k, v in self.headers.items()}}
        )
        for route_method, pattern, handler in self.ROUTES:
            match = re.match(pattern, url.path)
            if route_method == method and match:
                params = {k: urllib.parse.unquote(v) if v else v for k, v in match.groupdict().items()}
                return getattr(self, handler)(**params)
        self.send_error_code(404, "NotFound", f"No route for {method} {url.path}")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # === Helpers ===

    def send_error_code(self, status, code, message, extra_headers=None):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload, status=200):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def lookup(self, repo, rev):
        """Returns `(sha, tree)` or sends the Hub's error and returns None."""
        if repo not in self.hub.repos or (
            self.hub.repos[repo]["private"]
            and not self.headers.get("Authorization", "").startswith("Bearer ")
        ):
            self.send_error_code(401, "RepoNotFound", f"Repository not found: {repo}")
            return None
        found = self.hub.resolve(repo, rev)
        if found is None:
            self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return found

    # === Endpoints ===

    def gated_refusal(self, repo):
        """Sends the Hub's answer to a file request of a gated repo; True if refused.

        As on the Hub, only files are gated: repo info and listings stay public.
        """
        if repo not in self.hub.gated:
            return False
        authorization = self.headers.get("Authorization", "")
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else None
        if token is None:
            self.send_error_code(401, "GatedRepo", f"Access to model {repo} is restricted. You must "
                                 "have access to it and be authenticated to access it. Please log in.")
            return True
        if token not in self.hub.gated[repo]:
            self.send_error_code(403, "GatedRepo", f"Access to model {repo} is restricted and you are "
                                 f"not in the authorized list. Visit {self.server_url}/{repo} to ask "
                                 "for access.")
            return True
        return False

    def resolve_file(self, repo, rev, path):
        found = self.lookup(repo, rev)
        if found is None or self.gated_refusal(repo):
            return
        sha, tree = found
        if path not in tree:
            self.send_error_code(
                404, "EntryNotFound", f"{path} does not exist on {rev}",
                {"X-Repo-Commit": sha},
            )
            return
        data = tree[path]
        etag = self.hub.etag(path, data)
        fault = self.hub.faults.get((repo, path), {})
        if fault.get("times") is not None:  # a fault that fires `times` times
            if fault["times"] <= 0:
                fault = {}
            else:
                fault["times"] -= 1
        body = fault.get("serve", data)
        start, end, status = 0, len(body) - 1, 200
        ranged = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if ranged and self.command == "GET":
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(body) - 1
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Last-Modified", email.utils.formatdate(usegmt=True))
        self.end_headers()
        if self.command == "HEAD":
            return
        chunk = body[start:end + 1]
        if "cut_after" in fault:  # a connection that drops mid-download
            self.wfile.write(chunk[: fault["cut_after"]])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(chunk)

    def _siblings(self, tree):
        siblings = []
        for path, data in sorted(tree.items()):
            sibling = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if path.endswith(LFS_SUFFIXES):
                sibling["lfs"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            siblings.append(sibling)
        return siblings

    def repo_info(self, repo, rev=None):
        found = self.lookup(repo, rev or "main")
        if found is None:
            return
        sha, tree = found
        self.send_json({
            "_id": sha[:24], "id": repo, "modelId": repo, "sha": sha,
            "private": self.hub.repos[repo]["private"], "disabled": False,
            "gated": "manual" if repo in self.hub.gated else False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": "timm",
            "lastModified": "2024-01-01T00:00:00.000Z",
            "siblings": self._siblings(tree),
        })

    def repo_tree(self, repo, rev, path=None):
        found = self.lookup(repo, rev)
        if found is None:
            return
        _, tree = found
        prefix = f"{path.rstrip('/')}/" if path else ""
        entries = []
        for sibling in self._siblings(tree):
            name = sibling["rfilename"]
            if not name.startswith(prefix):
                continue
            entry = {"type": "file", "path": name, "size": sibling["size"], "oid": sibling["blobId"]}
            if "lfs" in sibling:
                entry["lfs"] = {"oid": sibling["lfs"]["sha256"], "size": sibling["size"],
                                "pointerSize": 134}
            entries.append(entry)
        self.send_json(entries)


    # === Upload endpoints ===

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def can_write(self, repo):
        """Private repos need a token, as for reads; public ones accept anyone here."""
        if repo not in self.hub.repos:
            self.send_error_code(404, "RepoNotFound", f"Repository not found: {repo}")
            return False
        if self.hub.repos[repo]["private"] and not self.headers.get("Authorization", "").startswith("Bearer "):
            self.send_error_code(401, "RepoNotFound", f"Repository not found: {repo}")
            return False
        return True

    def create_repo(self):
        payload = json.loads(self.read_body() or b"{}")
        repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if repo in self.hub.repos:
            # As the Hub: 409 with the repo URL, which create_repo(exist_ok=True) returns.
            self.send_json({"error": "You already created this model repo",
                            "url": f"{self.server_url}/{repo}"}, status=409)
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                        message="initial commit", private=private)
        self.send_json({"url": f"{self.server_url}/{repo}", "name": repo, "id": repo})

    @property
    def server_url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def preupload(self, repo, rev):
        if not self.can_write(repo):
            return
        payload = json.loads(self.read_body())
        files = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False, "oid": None}
            for f in payload["files"]
        ]
        self.send_json({"files": files, "commitOid": None})

    def lfs_batch(self, repo):
        if not self.can_write(repo):
            return
        payload = json.loads(self.read_body())
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                item["actions"] = {"upload": {"href": f"{self.server_url}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, oid):
        data = self.read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            self.send_error_code(400, "BadRequest", "sha256 mismatch of the uploaded object")
            return
        with self.hub.lock:
            self.hub.lfs[oid] = data
        self.send_json({})

    def validate_yaml(self):
        """Model card metadata: the YAML front matter must parse to a mapping."""
        content = json.loads(self.read_body()).get("content", "")
        errors = []
        try:
            import yaml

            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)  # the README's front matter
            meta = yaml.safe_load(match.group(1)) if match else None
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
        except ImportError:
            pass
        except Exception as error:  # yaml.YAMLError
            errors.append({"message": f"invalid YAML: {error}"})
        self.hub.validated_yaml.append(content)
        self.send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def create_branch(self, repo, branch):
        if not self.can_write(repo):
            return
        payload = json.loads(self.read_body() or b"{}")
        refs = self.hub.repos[repo]["refs"]
        if branch in refs:
            self.send_error_code(409, "Conflict", f"Reference already exists: {branch}")
            return
        found = self.hub.resolve(repo, payload.get("startingPoint") or "main")
        if found is None:
            self.send_error_code(404, "RevisionNotFound", "Invalid starting point")
            return
        refs[branch] = found[0]
        self.send_json({})

    def commit(self, repo, rev):
        if not self.can_write(repo):
            return
        lines = [json.loads(line) for line in self.read_body().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        files, deleted = {}, []
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    self.send_error_code(422, "BadRequest", f"LFS object {value['oid']} was not uploaded")
                    return
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        refs = self.hub.repos[repo]["refs"]
        if rev not in refs:
            self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        branch, pr_url = rev, None
        if self.query.get("create_pr") == ["1"]:
            number = sum(1 for ref in refs if ref.startswith("refs/pr/")) + 1
            branch = f"refs/pr/{number}"
            refs[branch] = refs[rev]
            pr_url = f"{self.server_url}/{repo}/discussions/{number}"
        sha = self.hub.commit(repo, files, message=header.get("summary", "commit"), branch=branch)
        if deleted:
            tree = self.hub.repos[repo]["commits"][sha]
            for path in deleted:
                for name in [n for n in tree if n == path or n.startswith(path.rstrip("/") + "/")]:
                    del tree[name]
        self.hub.commit_messages.append((repo, branch, header.get("summary")))
        self.send_json({
            "success": True, "commitOid": sha,
            "commitUrl": f"{self.server_url}/{repo}/commit/{sha}",
            "pullRequestUrl": pr_url,
        })


class HubServer:
    """Threaded HTTP server on 127.0.0.1 and a random free port.

    Args:
        hub: a `FakeHub` (default: a new, empty one).
        handler: the request handler class (default `HubHandler`).
    """

    def __init__(self, hub=None, handler=HubHandler):
        self.hub = hub or FakeHub()
        self.handler = handler
        self.httpd = None
        self.thread = None
        self.port = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        # Reuses the same port after stop(), so a cached endpoint stays valid.
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port or 0), self.handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self.hub
        self.httpd.connections = set()
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            # shutdown() only stops accepting: close the clients' kept-alive
            # connections too, so a stopped server looks like no network.
            for connection in list(self.httpd.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py
    with HubServer() as server:
        server.hub.commit("demo/repo", {"config.json": b"{}"})
        print(f"Serving demo/repo at {server.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def point_client_at(server, home, monkeypatch):
    """Points this process's huggingface_hub at `server` with a fresh HF_HOME.

    huggingface_hub reads its settings when imported, so in-process tests
    patch its `constants` (`monkeypatch` undoes it after the test).
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE",
        server.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)

