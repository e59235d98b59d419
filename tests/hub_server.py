"""A stand-in for the Hugging Face Hub on 127.0.0.1, for the push tests: the real ``huggingface_hub`` client talks to it
through ``HF_ENDPOINT``. It answers what a push needs (whoami, create a repository, create a branch, repository info,
validate a card's YAML, preupload, commit) and records every operation and every file it receives.

* Files are stored per repository and branch; ``preupload`` answers ``"regular"`` (so files come inline, base64, in
  the commit's ndjson) with the stored file's git blob id as ``oid``, as the Hub does, so the client skips a file the
  branch already holds unchanged.
* Every request must carry ``Authorization: Bearer <token>`` (401 otherwise).
* ``server.refuse = True``: every request is answered 403 (no write access); ``server.stop()``: the server is down
  (connections are refused); ``server.gate = threading.Event()``: each commit waits until the event is set.

Used in-process (:class:`HubServer` in a thread) or as a process: ``python tests/hub_server.py PORT TOKEN``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

USER = "align-tester"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool | None):
        self.repo_id, self.private = repo_id, private
        self.branches: dict[str, dict[str, bytes]] = {"main": {}}
        self.heads = {"main": "0" * 40}  # branch -> its last commit


class HubServer:
    """The stand-in Hub; ``url`` is its endpoint. ``operations`` lists every request it served, in order, as dicts
    with ``op`` (``whoami``, ``create_repo``, ``create_branch``, ``repo_info``, ``validate_yaml``, ``preupload``,
    ``commit``, ``refused``, ``unauthorized``, ``unknown``) and its details."""

    def __init__(self, port: int, token: str):
        self.token, self.refuse = token, False
        self.gate: threading.Event | None = None  # set: each commit waits for it (an upload held in flight)
        self.repos: dict[str, Repo] = {}
        self.operations: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- what the tests read ------------------------------------------------------------------------------------

    def ops(self, name: str) -> list[dict]:
        return [o for o in self.operations if o["op"] == name]

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[branch])

    def received(self, repo_id: str | None = None) -> list[str]:
        """Every path uploaded in any commit (to ``repo_id``), in order, repeats included."""
        return [p for c in self.ops("commit") if repo_id in (None, c["repo"]) for p in c["files"]]

    # --- the HTTP side ------------------------------------------------------------------------------------------

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def _reply(self, code: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = urlparse(self.path).path
                if server.gate is not None and "/commit/" in path:
                    with server.lock:
                        server.operations.append({"op": "commit_held", "path": path})
                    server.gate.wait(timeout=120)
                with server.lock:
                    if path == "/api/agent-harnesses":  # the client's telemetry registry: public, empty here
                        server.operations.append({"op": "agent_harnesses"})
                        return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
                    if server.refuse:
                        server.operations.append({"op": "refused", "path": path})
                        return self._reply(403, {"error": "You don't have the rights to create a model under this "
                                                          "namespace"})
                    if self.headers.get("Authorization") != f"Bearer {server.token}":
                        server.operations.append({"op": "unauthorized", "path": path})
                        return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    code, body, headers = server.route(method, path, raw)
                return self._reply(code, body, headers)

        return Handler

    def route(self, method: str, path: str, raw: bytes) -> tuple[int, dict, dict]:
        log = self.operations.append
        if method == "GET" and path == "/api/whoami-v2":
            log({"op": "whoami"})
            return 200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}}, {}
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(raw)
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            private = {"private": True, "public": False}.get(body.get("visibility"))
            log({"op": "create_repo", "repo": repo_id, "private": private})
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            self.repos[repo_id] = Repo(repo_id, private)
            return 200, {"url": url, "name": repo_id}, {}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(raw)["content"]
            log({"op": "validate_yaml"})
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}, {}
            if not isinstance(meta, (dict, type(None))):
                return 400, {"errors": [{"message": "the metadata must be a mapping"}]}, {}
            return 200, {"errors": [], "warnings": []}, {}
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(branch|preupload|commit|revision)/(.+))?$", path)
        if not m:
            log({"op": "unknown", "method": method, "path": path})
            return 404, {"error": "not found"}, {}
        repo_id, action, revision = m.group(1), m.group(2), unquote(m.group(3) or "main")
        repo = self.repos.get(repo_id)
        if repo is None:
            log({"op": action or "repo_info", "repo": repo_id, "missing": True})
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if action is None or (action == "revision" and method == "GET"):
            log({"op": "repo_info", "repo": repo_id, "revision": revision})
            siblings = [{"rfilename": p} for p in sorted(repo.branches.get(revision, {}))]
            return 200, {"id": repo_id, "sha": repo.heads.get(revision), "private": bool(repo.private),
                         "siblings": siblings}, {}
        if action == "branch":
            log({"op": "create_branch", "repo": repo_id, "branch": revision})
            if revision in repo.branches:
                return 409, {"error": "Branch already exists"}, {}
            repo.branches[revision] = dict(repo.branches["main"])
            repo.heads[revision] = repo.heads["main"]
            return 200, {}, {}
        if revision not in repo.branches:
            log({"op": action, "repo": repo_id, "revision": revision, "missing": True})
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        stored = repo.branches[revision]
        if action == "preupload":
            files = json.loads(raw)["files"]
            log({"op": "preupload", "repo": repo_id, "revision": revision, "files": [f["path"] for f in files]})
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": git_blob_id(stored[f["path"]]) if f["path"] in stored else None}
                                   for f in files]}, {}
        # commit: ndjson, a header then one line per file
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        received = {}
        for item in lines:
            if item["key"] == "file":
                value = item["value"]
                received[value["path"]] = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else value["content"].encode()
            elif item["key"] != "header":
                log({"op": "unsupported", "key": item["key"]})
                return 400, {"error": f"the stand-in Hub does not take {item['key']}"}, {}
        stored.update(received)
        oid = hashlib.sha1(f"{repo_id}:{revision}:{len(self.ops('commit'))}".encode()).hexdigest()
        repo.heads[revision] = oid
        log({"op": "commit", "repo": repo_id, "revision": revision, "summary": header["summary"],
             "files": sorted(received), "contents": received})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}


if __name__ == "__main__":
    srv = HubServer(int(sys.argv[1]), sys.argv[2]).start()
    print(f"stand-in Hub at {srv.url}", flush=True)
    srv.thread.join()
