"""A small client for ComfyUI's HTTP API: queue an API-format prompt, wait for it, read its outputs."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid


class PromptRejected(RuntimeError):
    """The server refused the prompt at validation (HTTP 400); ``details`` holds its JSON."""

    def __init__(self, details: dict):
        self.details = details
        super().__init__(json.dumps(details, indent=1)[:4000])


class PromptFailed(RuntimeError):
    """The prompt was accepted but a node raised; ``exception_type``/``exception_message`` as the host reports."""

    def __init__(self, node_type: str, exception_type: str, exception_message: str):
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        super().__init__(f"{node_type}: {exception_type}: {exception_message}")


class ComfyClient:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: dict | None = None):
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def object_info(self, node: str | None = None) -> dict:
        return self._request("/object_info" + (f"/{node}" if node else ""))

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            return self._request("/prompt", payload)["prompt_id"]
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.loads(e.read())) from None
            raise

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self._request(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") == "error":
                        for kind, msg in status.get("messages", []):
                            if kind == "execution_error":
                                raise PromptFailed(msg.get("node_type", "?"), msg.get("exception_type", "?"),
                                                   msg.get("exception_message", ""))
                        raise PromptFailed("?", "?", json.dumps(status)[:2000])
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue and wait; returns the history entry (``entry["outputs"][node_id]``)."""
        return self.wait(self.queue(prompt), timeout)

    @staticmethod
    def output_files(entry: dict, output_dir: str, node_id: str | None = None, key: str = "images") -> list[str]:
        files = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and nid != node_id:
                continue
            for item in out.get(key, []):
                files.append(os.path.join(output_dir, item.get("subfolder", ""), item["filename"]))
        return files
