"""A small local stand-in for the Hugging Face Hub HTTP API, enough for the real `huggingface_hub` client to create
repos and branches, commit files (regular uploads) and download them (resolve + repo info).

Tests point `HF_ENDPOINT` at `LocalHub().url` in a fresh process (huggingface_hub reads it at import time).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class LocalHub:
    """In-memory repos: `repos[repo_id] = {"private": bool, "branches": {name: {"sha": str, "files": {path: bytes}}}}`."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id]["branches"][revision]["files"])

    def _handler(hub):  # noqa: N805  (the handler closes over the hub)
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body=b"", headers=None, content_type="application/json"):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append(
                    {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization")}
                )
                return body

            def _authorized(self):
                auth = self.headers.get("Authorization") or ""
                if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                self._record()
                path = unquote(urlparse(self.path).path)
                if path == "/api/whoami-v2":
                    if self._authorized():
                        self._reply(200, {"type": "user", "name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
                    return
                info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if info:
                    return self._repo_info(info.group(1), info.group(2) or "main")
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve:
                    return self._resolve(*resolve.groups())
                self._reply(404, {"error": f"not found: {path}"})

            def _branch(self, repo_id, revision):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return None
                if revision in repo["branches"]:
                    return repo["branches"][revision]
                return next((b for b in repo["branches"].values() if b["sha"] == revision), None)

            def _repo_info(self, repo_id, revision):
                branch = self._branch(repo_id, revision)
                if branch is None:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                self._reply(200, {
                    "id": repo_id, "modelId": repo_id, "sha": branch["sha"], "private": hub.repos[repo_id]["private"],
                    "siblings": [{"rfilename": name} for name in sorted(branch["files"])],
                })

            def _resolve(self, repo_id, revision, filename):
                branch = self._branch(repo_id, revision)
                if branch is None:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if filename not in branch["files"]:
                    return self._reply(404, {"error": "Entry not found"},
                                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": branch["sha"]})
                data = branch["files"][filename]
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                self._reply(200, data, {"X-Repo-Commit": branch["sha"], "ETag": etag}, "application/octet-stream")

            def do_POST(self):
                body = self._record()
                path = unquote(urlparse(self.path).path)
                if not self._authorized():
                    return
                if path == "/api/validate-yaml":  # model card metadata check
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    return self._create_repo(json.loads(body or b"{}"))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._reply(404, {"error": f"not found: {path}"}, {"X-Error-Code": "RepoNotFound"})
                repo_id, action, revision = m.groups()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if action == "branch":
                    with hub._lock:
                        branches = hub.repos[repo_id]["branches"]
                        if revision not in branches:
                            branches[revision] = {"sha": branches["main"]["sha"], "files": dict(branches["main"]["files"])}
                    return self._reply(200, {})
                return self._commit(repo_id, revision, body)

            def _create_repo(self, payload):
                repo_id = f"{payload.get('organization') or 'me'}/{payload['name']}"
                with hub._lock:
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    sha = hashlib.sha1(repo_id.encode()).hexdigest()
                    private = bool(payload.get("private")) or payload.get("visibility") in ("private", "protected")
                    hub.repos[repo_id] = {"private": private, "branches": {"main": {"sha": sha, "files": {}}}}
                self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _commit(self, repo_id, revision, body):
                with hub._lock:
                    branch = hub.repos[repo_id]["branches"].get(revision)
                    if branch is None:
                        return self._reply(404, {"error": f"Revision {revision} not found"}, {"X-Error-Code": "RevisionNotFound"})
                    files = dict(branch["files"])
                    for line in body.splitlines():
                        item = json.loads(line)
                        value = item["value"]
                        if item["key"] == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "deletedFile":
                            files.pop(value["path"], None)
                        elif item["key"] in ("lfsFile", "deletedFolder"):
                            return self._reply(400, {"error": f"{item['key']} is not supported by the local hub"})
                    sha = hashlib.sha1(branch["sha"].encode() + body).hexdigest()
                    branch.update(sha=sha, files=files)
                self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                  "pullRequestUrl": None})

        return Handler
