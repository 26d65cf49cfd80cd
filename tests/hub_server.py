"""Loopback Hugging Face Hub for tests: a stdlib HTTP server speaking the subset of the Hub protocol that
huggingface_hub 2.x and transformers 5.x use to create repos, commit files and download them.

Routes (``{t}`` = ``models``/``datasets``/``spaces``, repo ids with or without a namespace):
``POST /api/repos/create``; ``GET /api/{t}/{repo}[/revision/{rev}]`` (``sha``, ``siblings``, ``gated``);
``GET /api/{t}/{repo}/tree/{rev}[/{path}]``; ``POST .../branch/{name}``;
``POST .../preupload/{rev}`` (every file ``regular``, so content comes inline, never LFS);
``POST .../commit/{rev}`` (NDJSON ``header``/``file``/``deletedFile``/``deletedFolder``, ``create_pr=1``);
``HEAD|GET /[datasets/|spaces/]{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag`` = git blob sha1 as
the real Hub sends for non-LFS files, ``Content-Length``, ``Range``); ``POST /api/validate-yaml``;
``GET /api/agent-harnesses``; ``GET /api/whoami-v2``; ``GET /api/{t}/{repo}/auth-check[/write]``. Each commit
gets a new sha and moves its branch; old shas stay readable.

Tokens. By default any bearer token (or none) may read and write. Once ``add_token(token, role)`` has registered
one, the server checks them as the Hub does: an unknown token gets 401 ``Invalid credentials in Authorization
header`` on any route; a write (repo creation, commit, preupload, branch, ``auth-check/write``) needs a token of
role ``write``: anonymous gets 401, a ``read`` token 403. Setting ``commit_error = (status, message)`` makes
every commit fail (a full quota, say) while repo creation and ``auth-check`` still succeed.

Errors carry ``X-Error-Code``, from which huggingface_hub picks its exception: a missing repo is ``RepoNotFound``
(401 anonymous, 404 with a token), a gated repo ``GatedRepo`` (401 anonymous, 403 with a wrong token),
``RevisionNotFound``/``EntryNotFound`` are 404 (the latter with ``X-Repo-Commit``, so the client caches the miss).
A bare 401 would not do: the client's fallback regex for it only matches ``https://`` URLs.

Environment recipe. ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and
``HF_HUB_DISABLE_XET`` once, at import, which pytest does long before a test runs. Two ways work:

(a) subprocess: ``env={**os.environ, **hub.client_env(home)}`` minus ``HF_HUB_OFFLINE``/``HF_TOKEN``: the child
    imports huggingface_hub with the right values. Works for any library, costs an interpreter start.
(b) in-process: ``hub_env(monkeypatch, hub)`` patches for one test what is read at call time: ``constants.ENDPOINT``,
    ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_OFFLINE`` (it blocks loopback too), ``HF_HUB_DISABLE_XET`` (hf_xet
    is installed and would route ``upload_folder`` through its pipeline), cache/token paths; plus three copies
    made earlier: ``huggingface_hub.hf_api.api.endpoint`` (the module-level ``HfApi`` behind ``create_repo``,
    ``upload_file``, ``upload_folder``, ``ModelCard.push_to_hub``), ``transformers.utils.hub._hf_api`` (a lazy
    shared ``HfApi``: reset, so it is rebuilt for the test and dropped after) and ``datasets.config.HF_ENDPOINT``
    when datasets is imported. ``HfApi`` objects built before the patch keep their endpoint. Example::

        @pytest.fixture
        def hub(tmp_path, monkeypatch):
            with LoopbackHub(tmp_path / "hub") as server:
                hub_env(monkeypatch, server, tmp_path / "hf_home")
                yield server

The server records ``(method, path, status)`` in ``hub.requests`` and never logs or stores headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_ACTIONS = {"revision", "tree", "preupload", "commit", "branch", "refs", "auth-check"}
_GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1 of ``data``: the Hub's ETag and preupload ``oid`` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answered with the Hub's ``X-Error-Code``/``X-Error-Message`` headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # commit sha -> {path: blob oid}
    gate_token: str | None = None
    n_prs: int = 0


class LoopbackHub:
    """A Hub on ``127.0.0.1`` (state in memory, blobs under ``root/blobs``); use as a context manager."""

    def __init__(self, root: Path, username: str = "user"):
        self.root, self.username = Path(root), username
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str, int]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.tokens: dict[str, str] = {}  # token -> "read" | "write"; empty: every request is allowed
        self.commit_error: tuple[int, str] | None = None  # (status, message) to refuse every commit with

    @property
    def url(self) -> str:
        """The endpoint, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("LoopbackHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LoopbackHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True  # idle keep-alive connections must not block shutdown
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        # The client's pooled keep-alive connections now point at a dead port.
        http = sys.modules.get("huggingface_hub.utils._http")
        if http is not None:
            http.close_session()

    def client_env(self, home: Path) -> dict[str, str]:
        """Environment variables for a client process (recipe (a)), with ``HF_HOME=home``."""
        return {
            "HF_ENDPOINT": self.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(Path(home) / "hub"),
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }  # fmt: skip

    # -- test-side API (no HTTP) ---------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        """Create ``repo_id`` with an initial ``.gitattributes`` commit, like the Hub; False if it exists."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                return False
            repo = self._repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, _now())
            self._new_commit(repo, "main", {".gitattributes": self._put_blob(_GITATTRIBUTES)}, "initial commit")
            return True

    def add_token(self, token: str, role: str = "write") -> None:
        """Register ``token`` with ``role`` ("read" or "write"); from then on tokens are checked (see Tokens)."""
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', not {role!r}")
        with self._lock:
            self.tokens[token] = role

    def gate(self, repo_id: str, token: str, repo_type: str = "model") -> None:
        """Gate ``repo_id`` (created if missing): downloading its files then needs ``Bearer {token}``."""
        with self._lock:
            self.create_repo(repo_id, repo_type)
            self._repos[(repo_type, repo_id)].gate_token = token

    def commit(self, repo_id: str, files: dict[str, bytes], message: str = "seed", repo_type: str = "model") -> str:
        """Commit ``files`` on ``main`` of an existing repo; returns the new commit sha."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            tree = {**repo.commits[repo.refs["main"]], **{p: self._put_blob(d) for p, d in files.items()}}
            return self._new_commit(repo, "main", tree, message)

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Bytes of ``path`` at ``revision`` (branch, ``refs/pr/N`` or commit sha)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return (self.blob_dir / repo.commits[self._resolve(repo, revision)][path]).read_bytes()

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            return self._resolve(self._repos[(repo_type, repo_id)], revision)

    # -- storage -------------------------------------------------------------------------------------------------
    def _put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        if not (self.blob_dir / oid).exists():
            (self.blob_dir / oid).write_bytes(data)
        return oid

    def _new_commit(self, repo: _Repo, ref: str, tree: dict[str, str], summary: str) -> str:
        self._counter += 1  # keeps two identical commits distinct, as git's timestamps would
        payload = json.dumps([repo.refs.get(ref), sorted(tree.items()), summary, self._counter])
        sha = hashlib.sha1(payload.encode()).hexdigest()
        repo.commits[sha], repo.refs[ref] = tree, sha
        return sha

    def _resolve(self, repo: _Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _get_repo(self, repo_type: str, repo_id: str, auth: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404 if auth else 401, "RepoNotFound", "Repository not found")
        return repo

    # -- routing -------------------------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, body: bytes, auth: str | None) -> tuple[int, dict, bytes]:
        """Answer one request as ``(status, headers, body)``; ``auth`` is the bearer token or None."""
        parts = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segs = parts.path.strip("/").split("/")  # split before unquoting: a revision may hold %2F
        try:
            with self._lock:
                self._check_token(method, segs, auth)
                if segs[0] == "api":
                    return self._api(method, segs[1:], query, body, auth)
                if "resolve" in segs and method in ("GET", "HEAD"):
                    return self._resolve_file(segs, auth)
                raise HubError(404, None, "Not Found")
        except HubError as err:
            return _error(err)
        except (KeyError, ValueError, TypeError) as err:  # malformed request: 400, which is never retried
            return _error(HubError(400, None, f"Bad request: {err!r}"))

    def _check_token(self, method: str, segs: list[str], auth: str | None) -> None:
        if not self.tokens:
            return
        if auth is not None and auth not in self.tokens:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        writes = (method in ("POST", "PUT", "DELETE") and segs[:2] != ["api", "validate-yaml"]) or (
            segs[0] == "api" and segs[-2:] == ["auth-check", "write"]
        )
        if writes and auth is None:
            raise HubError(401, None, "You must be authenticated to write to the Hub")
        if writes and self.tokens[auth] != "write":
            raise HubError(403, None, "You don't have the rights to write to this namespace with a read token")

    def _api(self, method, segs, query, body, auth):
        if segs == ["agent-harnesses"]:  # fetched by build_hf_headers to fill the user agent
            return _json({"standardEnvVars": [], "harnesses": {}})
        if segs == ["whoami-v2"] and method == "GET":
            if auth is None:
                raise HubError(401, None, "Invalid credentials in Authorization header")
            role = self.tokens.get(auth, "write")
            return _json({"type": "user", "name": self.username, "orgs": [],
                          "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": role}}})
        if segs == ["validate-yaml"] and method == "POST":
            return _json({"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_from_api(json.loads(body or b"{}"))
        if len(segs) < 2 or segs[0] not in _TYPES:
            raise HubError(404, None, "Not Found")
        rest = [unquote(s) for s in segs[1:]]
        n = 2 if len(rest) >= 2 and rest[1] not in _ACTIONS else 1
        repo = self._get_repo(_TYPES[segs[0]], "/".join(rest[:n]), auth)
        action, args = (rest[n], rest[n + 1 :]) if len(rest) > n else (None, [])
        if method == "GET" and action is None:
            return self._info(repo, "main")
        if method == "GET" and action == "revision" and args:
            return self._info(repo, args[0])
        if method == "GET" and action == "tree" and args:
            return self._tree(repo, args[0], "/".join(args[1:]), query.get("recursive", "").lower() == "true")
        if method == "POST" and action == "preupload" and args:
            tree = repo.commits.get(repo.refs.get(args[0], args[0]), {})
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
                for f in json.loads(body)["files"]
            ]
            return _json({"files": files})
        if method == "POST" and action == "commit" and args and self.commit_error:
            status, message = self.commit_error  # e.g. a storage quota reached
            raise HubError(status, None, message)
        if method == "POST" and action == "commit" and args:
            return self._commit(repo, args[0], body, query.get("create_pr") == "1")
        if method == "GET" and action == "auth-check":
            return _json({})
        if method == "POST" and action == "branch" and args:
            if args[0] in repo.refs:
                raise HubError(409, None, "Reference already exists")
            repo.refs[args[0]] = self._resolve(repo, json.loads(body or b"{}").get("startingPoint") or "main")
            return _json({})
        raise HubError(404, None, "Not Found")

    def _create_from_api(self, payload: dict):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        if not self.create_repo(repo_id, repo_type):
            # create_repo(exist_ok=True) still reads `url` from the 409 body.
            return 409, {"Content-Type": "application/json"}, json.dumps({"error": "exists", "url": url}).encode()
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo: _Repo, revision: str):
        sha = self._resolve(repo, revision)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        return _json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "author": author,
                "sha": sha, "createdAt": repo.created_at, "lastModified": repo.created_at, "private": False,
                "gated": "manual" if repo.gate_token else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": [{"rfilename": path} for path in sorted(repo.commits[sha])],
            }
        )  # fmt: skip

    def _tree(self, repo: _Repo, revision: str, prefix: str, recursive: bool):
        tree = repo.commits[self._resolve(repo, revision)]
        base = f"{prefix}/" if prefix else ""
        files = {p: oid for p, oid in tree.items() if p.startswith(base)}
        if prefix and not files:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
        entries, dirs = [], set()
        for path, oid in sorted(files.items()):
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(base + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                size = (self.blob_dir / oid).stat().st_size
                entries.append({"type": "file", "oid": oid, "size": size, "path": path})
        for d in sorted(dirs):
            listing = json.dumps(sorted((p, o) for p, o in tree.items() if p.startswith(d + "/")))
            tree_oid = hashlib.sha1(listing.encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_oid, "size": 0, "path": d})
        return _json(entries)

    def _commit(self, repo: _Repo, revision: str, body: bytes, create_pr: bool):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        if revision not in repo.refs:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        parent = repo.refs[revision]
        if header.get("parentCommit") not in (None, parent):
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[parent])
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                raw = value["content"]
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                tree[value["path"]] = self._put_blob(data)
            elif key == "deletedFile" and tree.pop(value["path"], None) is None:
                raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                tree = {p: o for p, o in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key == "lfsFile":
                raise HubError(400, None, "LoopbackHub stores every file inline: lfsFile is not supported")
        ref = revision
        if create_pr:
            repo.n_prs += 1
            ref = f"refs/pr/{repo.n_prs}"
            repo.refs[ref] = parent
        sha = self._new_commit(repo, ref, tree, header.get("summary", ""))
        repo_url = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"
        pr_url = f"{repo_url}/discussions/{repo.n_prs}" if create_pr else None
        return _json({"commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}", "pullRequestUrl": pr_url})

    def _resolve_file(self, segs: list[str], auth: str | None):
        i, repo_type = segs.index("resolve"), "model"
        if segs[0] in ("datasets", "spaces") and i > 1:
            repo_type, segs, i = _TYPES[segs[0]], segs[1:], i - 1
        if i == 0 or len(segs) < i + 3:
            raise HubError(404, None, "Not Found")
        repo = self._get_repo(repo_type, "/".join(unquote(s) for s in segs[:i]), auth)
        if repo.gate_token is not None and auth != repo.gate_token:
            what = f"Access to {repo.repo_type} {repo.repo_id} is restricted"
            if auth is None:
                raise HubError(401, "GatedRepo", f"{what}. You must be authenticated and have access to it.")
            raise HubError(403, "GatedRepo", f"{what} and you are not in the authorized list.")
        sha = self._resolve(repo, unquote(segs[i + 1]))
        oid = repo.commits[sha].get(unquote("/".join(segs[i + 2 :])))
        if oid is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}
        return 200, headers, (self.blob_dir / oid).read_bytes()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _error(err: HubError) -> tuple[int, dict, bytes]:
    message = err.message.encode("ascii", "replace").decode()  # headers are latin-1; paths may not be
    headers = {"X-Error-Message": message, "Content-Type": "application/json", **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return err.status, headers, json.dumps({"error": err.message}).encode()


def _json(obj) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every response must carry Content-Length

    def _serve(self) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        authorization = self.headers.get("Authorization", "")
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        status, headers, payload = hub.handle(self.command, self.path, body, token)
        start, end = 0, len(payload)
        byte_range = self.headers.get("Range", "")
        if status == 200 and byte_range.startswith("bytes=") and "ETag" in headers:  # resumed download
            lo, _, hi = byte_range[6:].partition("-")
            start, end = int(lo or 0), min(int(hi) + 1 if hi else len(payload), len(payload))
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{len(payload)}"
        hub.requests.append((self.command, self.path, status))
        self.send_response(status)
        for name, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload[start:end])

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # no stderr noise, and no chance of writing a header anywhere


def hub_env(monkeypatch, hub: LoopbackHub, home: Path | None = None) -> Path:
    """Point huggingface_hub (and transformers/datasets) at ``hub`` for one test: recipe (b) above.

    ``home`` (default ``hub.root.parent / "hf_home"``) becomes ``HF_HOME``: Hub cache, token files and agent
    registry go under it, and ``HF_TOKEN`` is unset. Returns ``home``. ``monkeypatch`` undoes everything.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    home = Path(home) if home is not None else hub.root.parent / "hf_home"
    home.mkdir(parents=True, exist_ok=True)
    env = hub.client_env(home)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN",
                 "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    cache = env["HF_HUB_CACHE"]
    patches = {
        "ENDPOINT": hub.url, "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}), "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HOME": str(home),
        "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache, "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "AGENT_HARNESSES_PATH": str(home / "agents.json"),
    }  # fmt: skip
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    try:
        import transformers.utils.hub as tf_hub
    except ImportError:
        tf_hub = None
    if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
        monkeypatch.setattr(tf_hub, "_hf_api", None)
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        monkeypatch.setattr(ds_config, "HF_ENDPOINT", hub.url)
        monkeypatch.setattr(ds_config, "HUB_DATASETS_URL", hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", False)
    _http.close_session()  # a fresh client re-reads proxy settings (NO_PROXY) from the environment
    return home
