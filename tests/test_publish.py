"""Publishing and hub access without the network: what would be uploaded, and every check before training.

The hub is played by a small HTTP server on 127.0.0.1 (the only address a test may talk to): it answers
``/api/whoami-v2`` like the hub does, and, asked for an absolute URL, acts as the HTTP proxy in front of it.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import REPO, run_script, subprocess_env

from dialogsum.config import HubArguments
from dialogsum.publish import NEVER_PUBLISHED, check_push, files_to_publish

HUB_VARS = ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")
PROXY_VARS = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)


def test_only_the_model_card_results_and_report_are_uploaded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    files = [
        "adapter_model.safetensors", "adapter_config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "README.md", "metrics.json", "config.yaml", "report.md", "plots/rouge.png",
        "plots/training.png", "model-00001-of-00002.safetensors",
        # never
        "predictions.jsonl", "log_history.jsonl", "parameters.json", "checkpoint-10/adapter_model.safetensors",
        "checkpoint-10/optimizer.bin", "checkpoint-20.tmp/model.safetensors", "quickstart_assets/tiny-t5/config.json",
        "quickstart_assets/data/train.jsonl", "merged/model.safetensors", "wandb/offline-run-x/run-x.wandb",
        "tensorboard/dialogsum/events.out.tfevents.1", "plots/notes.txt", "notes.md",
    ]  # fmt: skip
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert files_to_publish(run) == sorted(
        [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "generation_config.json",
            "metrics.json", "model-00001-of-00002.safetensors", "plots/rouge.png", "plots/training.png", "report.md",
            "tokenizer.json", "tokenizer_config.json",
        ]
    )  # fmt: skip
    assert {"checkpoint-*", "quickstart_assets/**"} <= set(NEVER_PUBLISHED)


class FakeHub(BaseHTTPRequestHandler):
    """``/api/whoami-v2`` as the hub answers it; every request is recorded (path as sent: absolute via a proxy)."""

    requests: list[tuple[str, str | None]] = []
    role = "write"

    def do_GET(self) -> None:  # noqa: N802 - the http.server handler name
        FakeHub.requests.append((self.path, self.headers.get("authorization")))
        if not self.path.endswith("/api/whoami-v2"):
            self._answer(404, {"error": "not found"})
        elif self.headers.get("authorization") == "Bearer hf_good":
            self._answer(200, {"name": "tester", "auth": {"accessToken": {"role": FakeHub.role}}})
        else:
            self._answer(401, {"error": "Invalid credentials in Authorization header"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.requests, FakeHub.role = [], "write"
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class DroppingEndpoint:
    """A TCP endpoint on 127.0.0.1 that accepts each connection and closes it unanswered, counting them: the hub
    is unreachable, and the count shows how many times the code tried (one probe, no retry loop)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            conn.close()


@pytest.fixture
def dropping_endpoint() -> Iterator[DroppingEndpoint]:
    endpoint = DroppingEndpoint()
    yield endpoint
    endpoint.sock.close()


def _check_in_subprocess(
    endpoint: str, env: dict[str, str], hub_model_id: str | None, token: str | None, private: bool = False
) -> dict:
    """check_push in a fresh process (huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and the proxy variables
    when it is imported): ``{"repo_id", "endpoint"}`` or ``{"error"}``."""
    code = (
        "import json; from dialogsum.config import HubArguments; from dialogsum.errors import UserError\n"
        "from dialogsum.publish import check_push\n"
        f"hub = HubArguments(push_to_hub=True, hub_model_id={hub_model_id!r}, hub_token={token!r}, "
        f"hub_private_repo={private!r})\n"
        "try:\n"
        "    t = check_push(hub, 'my run!')\n"
        "    print(json.dumps({'repo_id': t.repo_id, 'endpoint': t.endpoint, 'private': t.private}))\n"
        "except UserError as exc:\n"
        "    print(json.dumps({'error': str(exc)}))"
    )
    proc = run_script([sys.executable, "-c", code], env={**env, "HF_ENDPOINT": endpoint})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env_without_hub_vars(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if k not in (*HUB_VARS, *PROXY_VARS)}
    env.update(extra)
    return env


def test_push_check_names_the_repository_under_the_token_account(fake_hub: str, tmp_path: Path) -> None:
    env = _env_without_hub_vars(HF_HOME=str(tmp_path / "hf_home"))
    target = _check_in_subprocess(fake_hub, env, None, "hf_good")
    assert target == {"repo_id": "tester/my-run", "endpoint": fake_hub, "private": False}
    assert _check_in_subprocess(fake_hub, env, "org/model", "hf_good")["repo_id"] == "org/model"
    assert FakeHub.requests[0] == ("/api/whoami-v2", "Bearer hf_good")


def test_the_hub_check_goes_through_the_proxy(fake_hub: str, tmp_path: Path) -> None:
    """Behind a proxy the hub host itself is not reachable (here: not even resolvable); the HTTP check goes
    through HTTP_PROXY as huggingface_hub's downloads do, where a raw TCP probe would call the hub unreachable."""
    env = _env_without_hub_vars(HF_HOME=str(tmp_path / "hf_home"), HTTP_PROXY=fake_hub, http_proxy=fake_hub)
    target = _check_in_subprocess("http://hub.invalid", env, None, "hf_good")
    assert target["repo_id"] == "tester/my-run"
    assert FakeHub.requests[0][0] == "http://hub.invalid/api/whoami-v2"  # the absolute URL a proxy receives
    code = "from dialogsum.hub import hub_reachable; print(hub_reachable())"
    proc = run_script([sys.executable, "-c", code], env={**env, "HF_ENDPOINT": "http://hub.invalid"})
    assert proc.stdout.strip().splitlines()[-1] == "True", proc.stderr[-2000:]


def test_push_check_errors(fake_hub: str, tmp_path: Path) -> None:
    env = _env_without_hub_vars(HF_HOME=str(tmp_path / "hf_home"))
    no_token = _check_in_subprocess(fake_hub, env, None, None)["error"]
    assert "needs a Hugging Face token with write access: pass --hub_token, set HF_TOKEN" in no_token
    assert "rejected the token (HTTP 401)" in _check_in_subprocess(fake_hub, env, None, "hf_wrong")["error"]
    with_env_token = {**env, "HF_TOKEN": "hf_good"}  # the environment's token is used when no flag is given
    target = _check_in_subprocess(fake_hub, with_env_token, None, None, private=True)
    assert target == {"repo_id": "tester/my-run", "endpoint": fake_hub, "private": True}
    FakeHub.role = "read"
    assert "read-only" in _check_in_subprocess(fake_hub, with_env_token, None, None)["error"]
    offline = _check_in_subprocess(fake_hub, {**with_env_token, "HF_HUB_OFFLINE": "1"}, None, None)["error"]
    assert "offline mode" in offline
    assert check_push(HubArguments(push_to_hub=False), "run") is None


def test_a_push_run_fails_before_training_when_the_hub_is_unreachable(
    tmp_path: Path, dropping_endpoint: DroppingEndpoint
) -> None:
    out = tmp_path / "run"
    endpoint = dropping_endpoint.url
    env = _env_without_hub_vars(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=endpoint, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, str(REPO / "scripts" / "train_lora.py"), "--quickstart", "--output_dir", str(out),
        "--push_to_hub", "--hub_token", "hf_x", "--report_to", "none",
    ]  # fmt: skip
    proc = run_script(cmd, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert f"the Hugging Face Hub ({endpoint}) is unreachable" in errors[0]
    assert "Traceback" not in proc.stderr
    assert dropping_endpoint.connections == 1  # one probe with a short timeout, no retries: fails fast
    assert not out.exists()  # checked before anything was written or trained

    proc = run_script(cmd[:-4] + ["--report_to", "none"], env=env)  # no token anywhere
    assert proc.returncode == 1 and "needs a Hugging Face token" in proc.stderr


def test_model_and_dataset_hub_ids_fail_fast_on_an_unreachable_endpoint(
    tmp_path: Path, dropping_endpoint: DroppingEndpoint
) -> None:
    endpoint = dropping_endpoint.url
    env = _env_without_hub_vars(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=endpoint)
    code = (
        "from dialogsum.hub import ensure_hub_reachable, hub_reachable\n"
        "print(hub_reachable())\n"
        "ensure_hub_reachable('someone/not-cached', 'model', '--model_name_or_path /path')"
    )
    proc = run_script([sys.executable, "-c", code], env=env)
    assert proc.stdout.strip() == "False" and proc.returncode == 1
    assert f"the Hugging Face Hub ({endpoint}) is unreachable from this machine; pass a local path" in proc.stderr
    assert dropping_endpoint.connections == 2  # one probe each, no retries (transformers' own loader retries)
