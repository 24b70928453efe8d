"""Run the real ComfyUI server (loopback only) with PlugKit installed, and drive it over HTTP.

The server gets its own base directory (``--base-directory``), so a user's checkout named by
COMFYUI_PATH is never modified: the pack is linked into ``custom_nodes/ComfyUI-PlugKit``, the
checkpoint(s) into ``models/checkpoints``, and ``workflows/input`` is copied into ``input/``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tools.harness.host import REPO, comfy_args, comfyui_path

log = logging.getLogger(__name__)

PACK_FOLDER_NAME = "ComfyUI-PlugKit"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            return
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    dst.symlink_to(src, target_is_directory=src.is_dir())


class ComfyServer:
    """A ComfyUI server process. Use as a context manager; ``base`` is its base directory."""

    def __init__(self, base: Path, *, checkpoints: dict[str, Path] | None = None,
                 with_pack: bool = True, extra_args: list[str] | None = None,
                 model_files: dict[str, Path] | None = None):
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.with_pack = with_pack
        self.checkpoints = checkpoints or {}
        self.model_files = model_files or {}
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex

    # -- lifecycle -------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        pack_link = self.base / "custom_nodes" / PACK_FOLDER_NAME
        if self.with_pack:
            _link(REPO, pack_link)
        elif pack_link.is_symlink():
            pack_link.unlink()
        for name, path in self.checkpoints.items():
            _link(Path(path).resolve(), self.base / "models" / "checkpoints" / name)
        for rel, path in self.model_files.items():
            _link(Path(path).resolve(), self.base / "models" / rel)
        inputs = REPO / "workflows" / "input"
        if inputs.is_dir():
            for f in inputs.iterdir():
                if f.is_file():
                    shutil.copy2(f, self.base / "input" / f.name)

    def start(self, timeout: float = 300) -> "ComfyServer":
        import torch

        self.prepare()
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--user-directory", str(self.base / "user")]
        if not torch.cuda.is_available():
            cmd.append("--cpu")
        cmd += comfy_args() + self.extra_args
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: dict, timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """Wait for a queued prompt; return its history entry or raise with the server's error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_dead(prompt_id)
            try:
                hist = self.get(f"/history/{prompt_id}", timeout=60)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
                continue  # a busy server may answer slowly; only the overall deadline counts
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    errors = [m[1] for m in status.get("messages", []) if isinstance(m, list) and len(m) == 2
                              and m[0] == "execution_error" and isinstance(m[1], dict)]
                    # The error itself first: the message list also holds whole input tensors.
                    said = "; ".join(f"{e.get('node_type')} #{e.get('node_id')}: {e.get('exception_type')}: "
                                     f"{e.get('exception_message')}" for e in errors)
                    msgs = json.dumps(status.get("messages", []), indent=1)[-2000:]
                    raise ServerError(f"prompt {prompt_id} failed: {said}\n{msgs}")
                return entry
            time.sleep(0.5)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout}s")

    def _raise_if_dead(self, prompt_id: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_text()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 900) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def run_listening(self, prompt: dict, timeout: float = 900) -> tuple[dict, list[dict]]:
        """Like ``run``, while listening on the server's websocket (``/ws?clientId=<client_id>``, the
        id the prompt is queued with). Returns (history entry, messages received until the prompt
        ended): JSON messages as sent ({"type", "data"}), binary progress text decoded as
        {"type": "progress_text", "data": {"node", "text"}}, other binary events as
        {"type": "binary", "data": {"event", "size"}}."""
        prompt_id, messages = self.listen(prompt, timeout)
        return self.wait(prompt_id, timeout), messages

    def listen(self, prompt: dict, timeout: float = 900, on_message=None) -> tuple[str, list[dict]]:
        """Queue ``prompt`` and collect the websocket messages until it ended: (prompt id, messages).
        ``on_message(prompt_id, message)`` runs (in a worker thread) for every JSON message of this
        prompt as it arrives, e.g. to POST /interrupt at a chosen point."""
        import asyncio

        return asyncio.run(self._listen(prompt, timeout, on_message))

    async def _listen(self, prompt: dict, timeout: float, on_message=None) -> tuple[str, list[dict]]:
        import asyncio

        import aiohttp

        messages: list[dict] = []
        ws_url = f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                prompt_id = await asyncio.to_thread(self.queue, prompt)
                deadline = time.monotonic() + timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServerError(f"prompt {prompt_id}: no end message within {timeout}s")
                    try:
                        msg = await ws.receive(timeout=min(left, 5.0))
                    except asyncio.TimeoutError:
                        self._raise_if_dead(prompt_id)
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        m = json.loads(msg.data)
                        messages.append(m)
                        data = m.get("data") or {}
                        if on_message is not None and data.get("prompt_id") in (None, prompt_id):
                            await asyncio.to_thread(on_message, prompt_id, m)
                        if data.get("prompt_id") == prompt_id and (
                                m.get("type") in ("execution_success", "execution_error", "execution_interrupted")
                                or (m.get("type") == "executing" and data.get("node") is None)):
                            break
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        messages.append(decode_binary_message(msg.data))
                    else:  # closed or error
                        break
        return prompt_id, messages

    def output_files(self, entry: dict) -> list[Path]:
        """Files the history entry says were written (SaveImage and similar), as paths."""
        files = []
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                folder = {"output": "output", "temp": "temp", "input": "input"}[img.get("type", "output")]
                files.append(self.base / folder / img.get("subfolder", "") / img["filename"])
        return files


def decode_binary_message(data: bytes) -> dict:
    """A binary websocket message: 4-byte big-endian event type, then the payload. Event 3 (TEXT,
    ``PromptServer.send_progress_text``) is a 4-byte node-id length, the node id, then UTF-8 text."""
    import struct

    event = struct.unpack(">I", data[:4])[0]
    if event == 3:
        n = struct.unpack(">I", data[4:8])[0]
        return {"type": "progress_text", "data": {"node": data[8:8 + n].decode("utf-8"),
                                                  "text": data[8 + n:].decode("utf-8", errors="replace")}}
    return {"type": "binary", "data": {"event": event, "size": len(data) - 4}}


def generator_object_info(model_files: dict[str, Path] | None = None) -> dict:
    """``/object_info`` of a server with the pack, the random SD1.5 checkpoint and ``model_files``,
    for the workflow generation (``python -m tools.workflows``), which lays widgets out from it."""
    from tools.harness.host import cache_dir
    from tools.fixtures.models import CHECKPOINT_NAME, ensure_random_sd15_checkpoint

    base = cache_dir() / "workflows_base"
    with ComfyServer(base, checkpoints={CHECKPOINT_NAME: ensure_random_sd15_checkpoint()},
                     model_files=model_files) as server:
        return server.object_info()
