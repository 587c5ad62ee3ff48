"""A small Hugging Face Hub-compatible HTTP server for the registry's Hub tests (there is no network here).

It implements the subset of the Hub's HTTP API that ``huggingface_hub`` 2.x calls for what
``hotswap.registry.HubBackend`` does, for model repos only:

    POST   /api/repos/create                      create a repo (``visibility``/``private``), 409 if it exists
    POST   /api/validate-yaml                     README metadata check: always valid
    GET    /api/models?author=ORG                 list repos (private ones only with a token of ORG)
    GET    /api/models/{repo}[/revision/{rev}]    repo info (sha, private, siblings)
    GET    /api/models/{repo}/refs                branches and tags
    POST   /api/models/{repo}/tag/{rev}           create a tag, 409 if it exists
    DELETE /api/models/{repo}/tag/{tag}           delete a tag
    GET    /api/models/{repo}/tree/{rev}[/path]   file tree (recursive)
    POST   /api/models/{repo}/preupload/{rev}     always answers uploadMode "regular"
    POST   /api/models/{repo}/commit/{rev}        NDJSON commit of base64 files; 412 when parentCommit is stale
    HEAD/GET /{repo}/resolve/{rev}/{path}         file download with X-Repo-Commit / ETag / Content-Length

Auth: ``Authorization: Bearer`` tokens map to the orgs they may write; private repos are readable only
with such a token (others get RepoNotFound, as on the Hub); every write needs one.

Not covered, so untested against the real Hub: LFS and Xet uploads/downloads (every file travels as a
"regular" base64 commit entry), pull requests, repo types other than model, rate-limit headers,
redirects to a CDN, gated repos. Fault injection (:meth:`HubServer.fail`) answers a chosen status
(500, 429 ...), drops the connection in the middle of a body, or serves corrupted bytes, for the next
N matching requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or rev
        return self.commits.get(oid)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    action: str  # an HTTP status ("500", "429"), "drop" (cut the body short), "corrupt" (flip a downloaded byte)
    times: int


class HubServer:
    """``with HubServer(tokens={"tok": {"org"}}) as hub: os.environ["HF_ENDPOINT"] = hub.url``"""

    def __init__(self, tokens: dict[str, set[str]]) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, method: str, path_regex: str, action: str, times: int = 1) -> None:
        """Make the next ``times`` requests matching ``method`` and ``path_regex`` fail with ``action``."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(path_regex), action, times))

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.pattern.search(path) and fault.times > 0:
                    fault.times -= 1
                    return fault.action
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    # -- plumbing ------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object, error_code: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json(status, {"error": message}, code)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _orgs(self) -> set[str] | None:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return self.hub.tokens.get(token) if scheme.lower() == "bearer" else None

    def _readable(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return None
        if repo.private and repo_id.split("/")[0] not in (self._orgs() or set()):
            return None
        return repo

    def _writable(self, repo_id: str) -> Repo | None:
        orgs = self._orgs()
        if orgs is None:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        if repo_id.split("/")[0] not in orgs:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _dispatch(self) -> None:
        path = urlparse(self.path).path
        self.hub.requests.append((self.command, path))
        fault = self.hub.take_fault(self.command, path)
        if fault is not None and fault.isdigit():  # an injected status: "500", "503", "429" (rate limited) ...
            self._body()
            self._error(int(fault), f"injected {fault}")
            return
        self._fault = fault
        routes = [
            ("POST", r"^/api/repos/create$", self._create),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("GET", r"^/api/models$", self._list),
            ("GET", r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", self._info),
            ("GET", r"^/api/models/([^/]+/[^/]+)()$", self._info),
            ("GET", r"^/api/models/([^/]+/[^/]+)/refs$", self._refs),
            ("POST", r"^/api/models/([^/]+/[^/]+)/tag/(.+)$", self._tag),
            ("DELETE", r"^/api/models/([^/]+/[^/]+)/tag/(.+)$", self._untag),
            ("GET", r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", self._tree),
            ("POST", r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$", self._preupload),
            ("POST", r"^/api/models/([^/]+/[^/]+)/commit/(.+)$", self._commit),
            ("GET", r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self._resolve),
            ("HEAD", r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self._resolve),
        ]
        for method, pattern, fn in routes:
            m = re.match(pattern, path)
            if m and method == self.command:
                with self.hub.lock:
                    fn(*(unquote(g) if g else g for g in m.groups()))
                return
        self._error(404, f"no route for {self.command} {path}")

    do_GET = do_POST = do_DELETE = do_HEAD = _dispatch

    # -- endpoints -----------------------------------------------------------------------------------
    def _create(self) -> None:
        req = json.loads(self._body())
        repo_id = f"{req.get('organization')}/{req['name']}"
        orgs = self._orgs()
        if orgs is None or req.get("organization") not in orgs:
            self._error(403 if orgs else 401, f"cannot create {repo_id}")
            return
        if repo_id in self.hub.repos:  # the Hub's 409 carries the url too (exist_ok clients read it)
            self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            return
        private = req.get("visibility") == "private" or bool(req.get("private"))
        repo = Repo(private=private)
        oid = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, None, {".gitattributes": b""}, "initial commit")
        repo.branches["main"] = oid
        self.hub.repos[repo_id] = repo
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        self._body()
        self._json(200, {"errors": [], "warnings": []})  # README metadata: accepted as is

    def _list(self) -> None:
        author = parse_qs(urlparse(self.path).query).get("author", [None])[0]
        out = [
            {"id": rid, "modelId": rid, "private": repo.private}
            for rid, repo in sorted(self.hub.repos.items())
            if (author is None or rid.split("/")[0] == author) and self._readable(rid) is not None
        ]
        self._json(200, out)

    def _info(self, repo_id: str, rev: str | None) -> None:
        rev = rev or "main"
        repo = self._readable(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                         "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})  # fmt: skip

    def _refs(self, repo_id: str) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return

        def ref(kind: str, name: str, oid: str) -> dict:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        self._json(200, {"branches": [ref("heads", n, o) for n, o in repo.branches.items()],
                         "tags": [ref("tags", n, o) for n, o in repo.tags.items()], "converts": []})  # fmt: skip

    def _tag(self, repo_id: str, rev: str) -> None:
        body = json.loads(self._body())
        repo = self._writable(repo_id)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        elif body["tag"] in repo.tags:
            self._error(409, f"Tag {body['tag']} already exists")
        else:
            repo.tags[body["tag"]] = commit.oid
            self._json(200, {})

    def _untag(self, repo_id: str, tag: str) -> None:
        repo = self._writable(repo_id)
        if repo is None:
            return
        if repo.tags.pop(tag, None) is None:
            self._error(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        else:
            self._json(200, {})

    def _tree(self, repo_id: str, rev: str, prefix: str | None) -> None:
        repo = self._readable(repo_id)
        commit = repo.resolve(rev) if repo else None
        if repo is None or commit is None:
            code = "RepoNotFound" if repo is None else "RevisionNotFound"
            self._error(404, "not found", code)
            return
        entries = [
            {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for p, data in sorted(commit.files.items())
            if not prefix or p.startswith(prefix.rstrip("/") + "/")
        ]
        self._json(200, entries)

    def _preupload(self, repo_id: str, rev: str) -> None:
        body = json.loads(self._body())
        if self._writable(repo_id) is None:
            return
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in body["files"]
        ]
        self._json(200, {"files": files, "commitOid": None})

    def _commit(self, repo_id: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._writable(repo_id)
        if repo is None:
            return
        head = repo.branches.get(rev)
        if head is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        header = next(item["value"] for item in lines if item["key"] == "header")
        if header.get("parentCommit") and header["parentCommit"] != head:
            self._error(412, "A commit has happened since. Please refresh and try again.")
            return
        files = dict(repo.commits[head].files)
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif item["key"] in ("lfsFile", "deletedFolder"):
                self._error(400, f"{item['key']} is not supported by this test server")
                return
        oid = hashlib.sha1(
            f"{head} {len(repo.commits)} {sorted(files)}".encode() + b"".join(files.values())
        ).hexdigest()
        repo.commits[oid] = Commit(oid, head, files, header.get("summary", ""))
        repo.branches[rev] = oid
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})  # fmt: skip

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        if path not in commit.files:
            self._error(404, f"Entry not found: {path}", "EntryNotFound")
            return
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if self.command == "GET" and self._fault == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.command == "GET" and self._fault == "drop" and len(data) > 1:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(200, data, headers)
