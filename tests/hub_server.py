"""A local stand-in for the Hugging Face Hub's download API, for offline tests.

Speaks the part of the Hub HTTP API that `huggingface_hub` 2.x uses to
download files and read repo metadata:

    HEAD/GET /{org}/{name}/resolve/{revision}/{path}     file (Range supported)
    GET /api/models/{org}/{name}[/revision/{revision}]   repo info (sha, siblings)
    GET /api/models/{org}/{name}/tree/{revision}[/path]  file listing

Responses carry the headers the client reads: `X-Repo-Commit`, `ETag` (the
sha256 for LFS-like files, a git blob id otherwise), `Content-Length`,
`Accept-Ranges`; errors carry `X-Error-Code` (RepoNotFound, EntryNotFound,
RevisionNotFound) as the real Hub does. Private repos need
`Authorization: Bearer <token>`.

Extending (e.g. upload endpoints): subclass `HubHandler`, add
`(method, regex, handler_name)` tuples to `ROUTES`, and use `FakeHub.commit`
to store files. Every request is appended to `FakeHub.requests`.

Example:
    with HubServer() as server:
        server.hub.commit("timm/x", {"config.json": b"{}"})
        os.environ["HF_ENDPOINT"] = server.url   # before importing huggingface_hub
"""

import email.utils
import hashlib
import json
import re
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
    ]

    @property
    def hub(self):
        return self.server.hub

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # === Dispatch ===

    def _dispatch(self, method):
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        self.hub.requests.append(
            {"method": method, "path": url.path, "headers": dict(self.headers)}
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

    def resolve_file(self, repo, rev, path):
        found = self.lookup(repo, rev)
        if found is None:
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
            "private": self.hub.repos[repo]["private"], "disabled": False, "gated": False,
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
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
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
