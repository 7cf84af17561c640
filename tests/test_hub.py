"""Model card and push_to_hub, driven through the real huggingface_hub client against a loopback stub Hub.

The stub (``StubHub``) implements the four endpoints huggingface_hub 2.4 calls for ``create_repo`` +
``upload_folder``: ``POST /api/repos/create``, ``POST /api/validate-yaml``,
``POST /api/models/{repo}/preupload/{rev}`` (answers "regular" for every file, so contents travel in the
commit payload and no Xet/LFS storage is needed) and ``POST /api/models/{repo}/commit/{rev}`` (ndjson).
It checks the bearer token, records every request and keeps the committed files.
"""

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import huggingface_hub
import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors.numpy import save_file

from smpo_diffusers import hub
from smpo_diffusers.config import SmPOConfig
from smpo_diffusers.hub import (
    HubAuthenticationError,
    HubUploadError,
    check_hub_credentials,
    create_model_card,
    push_main,
    public_record,
    push_to_hub,
    redact,
    redacted_logging,
    release_files,
)

TOKEN = f"hf_TestToken{uuid.uuid4().hex}"
HUB_1 = int(huggingface_hub.__version__.split(".")[0]) >= 1
HUB_WIRE_FORMAT = pytest.mark.skipif(
    not HUB_1, reason="asserts the requests of huggingface_hub >= 1.0 (create's visibility field, the request order, "
                      "retried commits)")
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD_BASE = "runwayml/stable-diffusion-v1-5"
PICKAPIC = "yuvalkirstain/pickapic_v2"
LORA_RELEASE = {"README.md", "pytorch_lora_weights.safetensors", "training_config.json", "training_metrics.json",
                "validation.png"}


# ---------------------------------------------------------------------------- the stub Hub
class StubHub:
    """A tiny loopback Hub: see the module docstring. ``fail[route] = status`` makes a route answer that status."""

    def __init__(self, token: str, namespace: str = "stub-user"):
        self.token, self.namespace = token, namespace
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                stub.handle(self)

            do_GET = do_PUT = do_DELETE = do_HEAD = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def routes(self) -> list[str]:
        return [r["route"] for r in self.requests]

    # -- request handling
    def handle(self, request):
        url = urlsplit(request.path)
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if url.path == "/api/agent-harnesses":  # huggingface_hub's own daily registry fetch: not ours to record
            return self._send(request, 404, {"error": "not served by the stub"})
        route, repo = self._route(request.command, url.path)
        with self.lock:
            self.requests.append({"method": request.command, "path": url.path, "route": route, "repo": repo,
                                  "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(request, 401, {"error": "Invalid credentials in Authorization header"})
        if route in self.fail:
            return self._send(request, self.fail[route], {"error": f"stub failure on {route}"})
        if route == "create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or self.namespace}/{payload['name']}"
            exists = repo_id in self.repos
            visibility = payload.get("visibility")  # huggingface_hub < 1.0 sends "private": true/false instead
            if visibility is None and "private" in payload:
                visibility = "private" if payload["private"] else "public"
            self.repos.setdefault(repo_id, {"files": {}, "commits": [], "visibility": visibility})
            answer = {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex}
            return self._send(request, 409 if exists else 200,
                              {"error": "You already created this model repo", **answer} if exists else answer)
        if route == "validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if not match:
                return self._send(request, 200, {"errors": [], "warnings": [{"message": "empty or missing yaml"}]})
            try:
                assert isinstance(yaml.safe_load(match.group(1)), dict)
            except (AssertionError, yaml.YAMLError) as error:
                return self._send(request, 400, {"errors": [{"message": f"bad metadata: {error!r}"}]})
            return self._send(request, 200, {"errors": [], "warnings": []})
        if route == "info":
            if repo not in self.repos:
                return self._send(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return self._send(request, 200, {"id": repo, "private": self.repos[repo]["visibility"] == "private",
                                             "xetEnabled": False})
        if route in ("preupload", "commit") and repo not in self.repos:
            return self._send(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if route == "preupload":
            files = json.loads(body)["files"]
            return self._send(request, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        if route == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header, operations = lines[0], lines[1:]
            assert header["key"] == "header"
            if any(op["key"] != "file" for op in operations):
                return self._send(request, 400, {"error": "stub accepts regular files only"})
            state = self.repos[repo]
            for op in operations:
                state["files"][op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            state["commits"].append({"summary": header["value"]["summary"],
                                     "paths": [op["value"]["path"] for op in operations]})
            return self._send(request, 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid,
                                             "success": True})
        return self._send(request, 404, {"error": f"stub does not implement {request.command} {url.path}"})

    @staticmethod
    def _route(method: str, path: str) -> tuple[str, str | None]:
        if method == "POST" and path == "/api/repos/create":
            return "create", None
        if method == "POST" and path == "/api/validate-yaml":
            return "validate-yaml", None
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/[^/]+", path)
        if method == "POST" and match:
            return match.group(2), match.group(1)
        # (huggingface_hub < 1.0 asks for the info at a revision, for xetEnabled, before an upload)
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if method == "GET" and match:
            return "info", match.group(1)
        return f"unknown {method} {path}", None

    @staticmethod
    def _send(request, status: int, payload: dict, headers: dict | None = None):
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)


@pytest.fixture(autouse=True)
def isolated_credentials(monkeypatch, tmp_path):
    """No real login can leak in: no token variables, the token file points into tmp_path."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the suite
    try:  # huggingface_hub < 1.0 caches its requests session, made offline earlier in the suite
        from huggingface_hub.utils._http import reset_sessions
    except ImportError:
        pass
    else:
        reset_sessions()


@pytest.fixture
def stub_hub(monkeypatch):
    stub = StubHub(TOKEN).start()
    # huggingface_hub < 1.0 parses the repository URLs it gets back against the configured endpoint
    monkeypatch.setattr(hf_constants, "ENDPOINT", stub.endpoint)
    yield stub
    stub.stop()


# ---------------------------------------------------------------------------- realistic output folders
def write_output_folder(folder, *, family="sdxl", layout="lora", validation=True, checkpoints=True,
                        **config_overrides):
    """An output folder shaped like SmPOTrainer.save_model's (+ final validation, checkpoints, tracker logs)."""
    os.makedirs(folder, exist_ok=True)
    options = dict(pretrained_model_name_or_path=SDXL_BASE if family == "sdxl" else SD_BASE,
                   dataset_name=PICKAPIC, output_dir=str(folder), max_train_steps=2000, learning_rate=1e-5,
                   train_batch_size=2, gradient_accumulation_steps=4,
                   train_method="lora" if layout == "lora" else "full",
                   validation_prompts=["a cat | wearing a hat", "a lighthouse at dusk"] if validation else None)
    options.update(config_overrides)
    config = SmPOConfig(**options).resolve_model_defaults(is_sdxl=family == "sdxl")
    summary = config.to_dict() | {
        "model_family": family, "prediction_type": "epsilon", "reward_columns": ["reward_0", "reward_1"],
        "reward_scale": 0.16658, "reward_scale_source": f"{config.dataset_name}/reward_stats.json",
        "effective_batch_size": 16, "num_processes": 2, "mixed_precision": "bf16",
        "pairs": {"total": 100, "kept": 90, "dropped_ties": 6, "dropped_invalid": 4, "dropped_nonfinite": 0,
                  "kept_ties": 0, "mean_prob_w": 0.61, "dropped_by_max_samples": 0, "reward_disagreements": 3,
                  "missing_captions": 0, "zero_weight_pairs": 5},
    }
    with open(os.path.join(folder, "training_config.json"), "w") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    metrics = {"global_step": 2000,
               "final_metrics": {"loss": 0.5432, "implicit_acc": 0.75, "reward_margin": 1.25, "lr": 1e-5},
               "unet_evaluations": {"inversion": 10, "policy": 8, "reference": 8}, "skipped": {"empty_batches": 0}}
    with open(os.path.join(folder, "training_metrics.json"), "w") as handle:
        json.dump(metrics, handle)
    weights = {"unet.down.lora_A.weight": np.ones((2, 4), dtype=np.float32)}
    if layout == "lora":
        save_file(weights, os.path.join(folder, "pytorch_lora_weights.safetensors"))
    else:
        os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
        with open(os.path.join(folder, "unet", "config.json"), "w") as handle:
            json.dump({"_class_name": "UNet2DConditionModel"}, handle)
        save_file(weights, os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
        if layout == "pipeline":
            with open(os.path.join(folder, "model_index.json"), "w") as handle:
                json.dump({"_class_name": "StableDiffusionPipeline"}, handle)
    if validation:
        Image.new("RGB", (16, 8), "red").save(os.path.join(folder, "validation.png"))
        Image.new("RGB", (16, 8), "blue").save(os.path.join(folder, "validation-step100.png"))
    if checkpoints:
        for name in ("checkpoint-1000", ".checkpoint-2000.tmp"):
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            with open(os.path.join(folder, name, "optimizer.bin"), "wb") as handle:
                handle.write(b"\0" * 64)
        os.makedirs(os.path.join(folder, "logs", "smpo"), exist_ok=True)
        with open(os.path.join(folder, "logs", "smpo", "events.out.tfevents.1.host"), "wb") as handle:
            handle.write(b"tb")
    return str(folder)


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def assert_token_in_no_file(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read(), name


# ---------------------------------------------------------------------------- push: the happy path
@HUB_WIRE_FORMAT
def test_push_uploads_the_release_files_with_a_valid_card(tmp_path, stub_hub, caplog):
    caplog.set_level(logging.DEBUG)
    out = write_output_folder(tmp_path / "run")
    url = push_to_hub(out, "my-org/smpo-sdxl", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))

    assert stub_hub.routes() == ["create", "validate-yaml", "preupload", "commit"]
    create = json.loads(stub_hub.requests[0]["body"])
    assert create == {"name": "smpo-sdxl", "organization": "my-org", "visibility": "public"}
    assert {r["repo"] for r in stub_hub.requests[2:]} == {"my-org/smpo-sdxl"}
    repo = stub_hub.repos["my-org/smpo-sdxl"]
    assert set(repo["files"]) == LORA_RELEASE
    assert repo["commits"] == [{"summary": "Upload SmPO-aligned weights", "paths": sorted(LORA_RELEASE)}]
    for path, content in repo["files"].items():
        if path in ("training_config.json", "training_metrics.json"):
            # uploaded without local paths (home folders, user names); the local files keep them
            assert str(tmp_path).encode() not in content
            assert public_record(json.load(open(os.path.join(out, path)))) == json.loads(content)
        else:
            assert content == open(os.path.join(out, path), "rb").read(), path
    uploaded = json.loads(repo["files"]["training_config.json"])
    assert uploaded["output_dir"] == "run" and json.load(open(os.path.join(out, "training_config.json")))[
        "output_dir"] == out
    assert uploaded["pretrained_model_name_or_path"] == SDXL_BASE and uploaded["dataset_name"] == PICKAPIC
    assert url.startswith(f"{stub_hub.endpoint}/my-org/smpo-sdxl/commit/")

    # The card as the Hub would parse it back.
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "README.md").write_bytes(repo["files"]["README.md"])
    for card in (ModelCard.load(os.path.join(out, "README.md")), ModelCard.load(tmp_path / "remote" / "README.md")):
        data = card.data
        assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
        assert data.base_model == SDXL_BASE and data.license == "openrail++" and data.datasets == [PICKAPIC]
        assert data.tags == ["text-to-image", "diffusers", "smpo", "dpo", "lora", "stable-diffusion-xl"]
    text = card.text
    assert "![validation](validation.png)" in text and "1. a cat | wearing a hat" in text
    assert 'pipeline.load_lora_weights("my-org/smpo-sdxl", weight_name="pytorch_lora_weights.safetensors")' in text
    assert "StableDiffusionXLPipeline.from_pretrained(base_model" in text
    for needle in ("| β (`beta_dpo`) | 5000 |", "| γ (`gamma`) | 10 |", "| Inversion steps N | 10 |",
                   "| ReNoise steps K | 1 |", "| Inversion model | policy |", "| Inversion grid | exact |",
                   "| Training steps | 2000 of 2000 |", "| Mixed precision | bf16 |", "`implicit_acc` | 0.75 |",
                   "`loss` | 0.5432 |", "reward_stats.json", "Lu, Yunhong and Wang, Qichao", "40709--40725",
                   "2506.02698", "16 pairs (2 per device × 4 accumulation × 2 processes)", "90 were used"):
        assert needle in text, needle

    # The token went only into the Authorization header.
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in stub_hub.requests)
    assert_token_in_no_file(out)
    assert caplog.records and not any(TOKEN in record.getMessage() for record in caplog.records)


@HUB_WIRE_FORMAT
def test_bare_name_defaults_private_repo_existing_repo_and_custom_logging_dir(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "smpo-run", family="sd", layout="unet", validation=False,
                              logging_dir="runs/tb")
    os.makedirs(os.path.join(out, "runs", "tb"))
    open(os.path.join(out, "runs", "tb", "events"), "w").write("x")
    api = HfApi(endpoint=stub_hub.endpoint)
    push_to_hub(out, private=True, token=TOKEN, api=api, commit_message="first")
    # no repo id anywhere: the folder name, in the token owner's namespace (the id create_repo answers)
    assert json.loads(stub_hub.requests[0]["body"]) == {
        "name": "smpo-run", "organization": None, "visibility": "private"}
    repo = stub_hub.repos["stub-user/smpo-run"]
    assert set(repo["files"]) == {"README.md", "training_config.json", "training_metrics.json", "unet/config.json",
                                  "unet/diffusion_pytorch_model.safetensors"}
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert "validation" not in card.text.lower().split("## usage")[0].split("## final training metrics")[1]
    assert 'UNet2DConditionModel.from_pretrained("stub-user/smpo-run", subfolder="unet"' in card.text

    # pushing again: create answers 409 (exists_ok), the card is regenerated, a second commit lands
    push_to_hub(out, "smpo-run", token=TOKEN, api=api, commit_message="second")
    assert [c["summary"] for c in repo["commits"]] == ["first", "second"]
    assert stub_hub.routes().count("create") == 2

    # a private push onto an existing public repository would publish the weights: refused, nothing uploaded
    stub_hub.repos["stub-user/public-run"] = {"files": {}, "commits": [], "visibility": "public"}
    with pytest.raises(ValueError, match="already exists and is public"):
        push_to_hub(out, "public-run", private=True, token=TOKEN, api=api)
    assert stub_hub.repos["stub-user/public-run"]["commits"] == [] and stub_hub.routes()[-1] == "info"


def test_evaluation_folder_and_an_absolute_logging_dir_inside_the_output_stay_local(tmp_path, stub_hub):
    folder = tmp_path / "run"
    out = write_output_folder(folder, logging_dir=str(folder / "tb-logs"), validation=False)
    for relative in ("tb-logs/events.out", "evaluation/results.json", "evaluation/grid.png"):
        os.makedirs(os.path.dirname(os.path.join(out, relative)), exist_ok=True)
        open(os.path.join(out, relative), "w").write(str(folder))  # names local folders
    push_to_hub(out, "me/run", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    assert set(stub_hub.repos["me/run"]["files"]) == {"README.md", "pytorch_lora_weights.safetensors",
                                                      "training_config.json", "training_metrics.json"}


@HUB_WIRE_FORMAT
def test_hub_model_id_and_privacy_from_the_training_config_are_the_defaults(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "run", push_to_hub=True, hub_model_id="team/from-config", hub_private=True)
    push_to_hub(out, token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    assert set(stub_hub.repos) == {"team/from-config"}
    assert json.loads(stub_hub.requests[0]["body"])["visibility"] == "private"  # --hub_private of the run
    assert "team/from-config" in ModelCard.load(os.path.join(out, "README.md")).text


# ---------------------------------------------------------------------------- credentials
def test_no_token_fails_before_any_request(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(HubAuthenticationError, match="hf auth login") as error:
        push_to_hub(out, "me/x", api=HfApi(endpoint=stub_hub.endpoint))
    assert "HF_TOKEN" in str(error.value) and "huggingface-cli login" in str(error.value)
    assert stub_hub.requests == [] and snapshot(out) == before
    with pytest.raises(HubAuthenticationError):
        check_hub_credentials()


def test_token_resolution_order(monkeypatch):
    token_file = hf_constants.HF_TOKEN_PATH
    os.makedirs(os.path.dirname(token_file))
    with open(token_file, "w") as handle:
        handle.write("hf_saved_login")
    assert check_hub_credentials() == "hf_saved_login"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert check_hub_credentials() == "hf_from_env"
    assert check_hub_credentials("hf_argument") == "hf_argument"
    with pytest.raises(ValueError, match="--hub_model_id"):
        check_hub_credentials(repo_id="not a/valid/id")


def test_offline_mode_is_reported_up_front(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAuthenticationError, match="HF_HUB_OFFLINE"):
        check_hub_credentials("hf_argument")


def test_redaction_of_messages_and_tracebacks(caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("smpo_diffusers.some.module")
    assert redact(f"Bearer {TOKEN}!", TOKEN) == "Bearer ***!" and redact("x", None) == "x"
    with redacted_logging(TOKEN):
        log.info("header %s", f"Bearer {TOKEN}")
        try:
            raise RuntimeError(f"server echoed {TOKEN}")
        except RuntimeError:
            log.exception("failed")
    assert [r.getMessage() for r in caplog.records] == ["header Bearer ***", "failed"]
    assert "server echoed ***" in caplog.text and TOKEN not in caplog.text
    assert not any(isinstance(f, hub._TokenRedactionFilter) for f in caplog.handler.filters)


def test_a_file_holding_the_token_is_never_uploaded(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "run")
    with open(os.path.join(out, "README.md"), "w") as handle:  # the user's own card, uploaded as is
        handle.write(f"# my model\nexport HF_TOKEN={TOKEN}\n")
    with pytest.raises(HubUploadError, match="README.md") as error:
        push_to_hub(out, "me/x", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint), create_card=False)
    assert TOKEN not in str(error.value) and stub_hub.requests == []


def test_push_uploads_the_release_files_only_and_refuses_an_unfinished_save(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "run", validation=False)
    strays = ("notes.txt", "results.json", "grid.png", "validation.png", "eval/results.json", "unet-notes/a.txt",
              ".final-x/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors.123.tmp")
    for relative in strays:  # a stale grid of an earlier run with validation prompts; evaluation output; notes
        os.makedirs(os.path.dirname(os.path.join(out, relative)), exist_ok=True)
        open(os.path.join(out, relative), "w").write(str(tmp_path))
    expected = ["README.md", "pytorch_lora_weights.safetensors", "training_config.json", "training_metrics.json"]
    assert release_files(out) == [name for name in expected if name != "README.md"]  # no card written yet
    push_to_hub(out, "me/run", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    assert sorted(stub_hub.repos["me/run"]["files"]) == expected

    full = write_output_folder(tmp_path / "full", layout="unet")
    os.makedirs(os.path.join(full, "unet-old"))
    open(os.path.join(full, "unet-old", "x.bin"), "w").write("x")
    assert release_files(full) == ["training_config.json", "training_metrics.json", "unet/config.json",
                                   "unet/diffusion_pytorch_model.safetensors", "validation.png"]

    os.remove(os.path.join(out, "training_metrics.json"))
    with pytest.raises(FileNotFoundError, match="no training_metrics.json: its save did not finish"):
        push_to_hub(out, "me/run2", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    with open(os.path.join(out, "training_metrics.json"), "w") as handle:
        handle.write('{"global_step": 3, "final_')  # truncated
    with pytest.raises(ValueError, match="training_metrics.json is not valid JSON .*save the run again"):
        push_to_hub(out, "me/run2", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    assert "me/run2" not in stub_hub.repos


# ---------------------------------------------------------------------------- failures
class _NoSleepTime:
    """huggingface_hub's retry loop, without the waiting (records the requested pauses)."""

    def __init__(self):
        self.pauses = []

    def sleep(self, seconds):
        self.pauses.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


@HUB_WIRE_FORMAT
def test_failed_upload_names_the_retry_command_and_keeps_the_output(tmp_path, stub_hub, monkeypatch, caplog):
    from huggingface_hub.utils import _http

    clock = _NoSleepTime()
    monkeypatch.setattr(_http, "time", clock)
    out = write_output_folder(tmp_path / "run")
    create_model_card(out, repo_id="me/smpo")
    before = snapshot(out)
    stub_hub.fail["commit"] = 500
    with pytest.raises(HubUploadError) as error:
        push_to_hub(out, "me/smpo", private=True, token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    message = str(error.value)
    assert f"python examples/push_to_hub.py {out} --hub_model_id me/smpo --private" in message
    assert "smpo_diffusers.hub.push_to_hub(" in message and "intact" in message and TOKEN not in message
    assert "private=True)" in message
    assert isinstance(error.value.__cause__, HfHubHTTPError)
    assert error.value.__cause__.response.status_code == 500
    # the real client retried the commit before giving up; nothing was committed
    assert stub_hub.routes().count("commit") == len(clock.pauses) + 1 > 1
    assert stub_hub.repos["me/smpo"]["files"] == {}
    assert snapshot(out) == before
    assert not any(TOKEN in record.getMessage() for record in caplog.records)


def test_refused_token_is_an_upload_error(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "run")
    with pytest.raises(HubUploadError, match="Invalid credentials") as error:
        push_to_hub(out, "me/x", token="hf_wrong", api=HfApi(endpoint=stub_hub.endpoint))
    assert "--hub_model_id me/x" in str(error.value)
    # create_repo(exist_ok=True) answers a 401 by checking whether the repo exists (GET repo info); nothing uploads
    assert stub_hub.routes()[0] == "create" and not {"preupload", "commit"} & set(stub_hub.routes())


# ---------------------------------------------------------------------------- the card alone
def test_local_base_model_and_dataset_stay_out_of_metadata(tmp_path):
    base = tmp_path / "private" / "my-sd15-base"
    data = tmp_path / "private" / "my-prefs"
    base.mkdir(parents=True)
    data.mkdir()
    from smpo_diffusers.rewards.statistics import save_reward_statistics

    save_reward_statistics(str(data), {"reward_model": "pickscore", "count": 2, "min": 0.0, "max": 1.0,
                                       "mean": 0.5, "std": 0.5, "suggested_scale": 1.0})
    out = write_output_folder(tmp_path / "out", family="sd", layout="pipeline",
                              pretrained_model_name_or_path=str(base), dataset_name=str(data))
    card = create_model_card(out)
    text = open(os.path.join(out, "README.md")).read()
    assert str(tmp_path) not in text
    assert card.data.base_model is None and card.data.datasets is None
    # a local base's license cannot be known: not guessed from the family, the uploader is asked to state it
    assert card.data.license == "other" and "must state the base model's license" in text
    assert card.data.tags == ["text-to-image", "diffusers", "smpo", "dpo", "full-unet", "stable-diffusion"]
    assert "`my-sd15-base`" in text and "`my-prefs`" in text and "| Reward model | pickscore |" in text
    assert ("Of its 100 pairs, 90 were used (dropped: 6 ties, 4 invalid labels, 0 non-finite rewards, 0 beyond "
            "max_train_samples). 5 of the used pairs carried no preference (prob_w 0.5: equal rewards or ties) and "
            "gave no gradient.") in text
    assert 'DiffusionPipeline.from_pretrained("out"' in text


def test_cache_snapshot_paths_license_rules_and_dpo_card(tmp_path):
    snapshot_dir = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-1" / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    out = write_output_folder(tmp_path / "out", family="sd", pretrained_model_name_or_path=str(snapshot_dir),
                              loss_type="dpo", noise_source="random", dataset_name="data/train.parquet")
    card = create_model_card(out, repo_id="me/dpo")
    assert card.data.base_model == "stabilityai/stable-diffusion-2-1"
    assert card.data.license == "openrail++"  # SD 2.x
    assert card.data.datasets is None
    assert "| γ (`gamma`) | not used (hard labels) |" in card.text and "Reward model" not in card.text
    assert "Inversion steps" not in card.text and "random forward noising" in card.text
    assert create_model_card(out, repo_id="me/dpo", license="mit").data.license == "mit"
    assert hub.hub_id_or_none("/abs/path/model") is None and hub.hub_id_or_none("org/name") == "org/name"
    with pytest.raises(ValueError, match="layout"):
        hub.usage_snippet(layout="adapter", family="sd", repo_id="me/x", base_model=None, prompt="p")


def test_card_refuses_to_overwrite_a_hand_written_readme_and_checks_the_folder(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "out")
    with open(os.path.join(out, "README.md"), "w") as handle:
        handle.write("# my own notes\n")
    with pytest.raises(FileExistsError, match="create_card=False"):
        create_model_card(out)
    assert open(os.path.join(out, "README.md")).read() == "# my own notes\n"
    with pytest.warns(UserWarning, match="metadata"):  # the Hub's warning for a card without YAML metadata
        push_to_hub(out, "me/own", token=TOKEN, create_card=False, api=HfApi(endpoint=stub_hub.endpoint))
    assert stub_hub.repos["me/own"]["files"]["README.md"] == b"# my own notes\n"

    os.remove(os.path.join(out, "pytorch_lora_weights.safetensors"))
    with pytest.raises(FileNotFoundError, match="no saved weights"):
        create_model_card(out)
    mixed = write_output_folder(tmp_path / "mixed", layout="unet")
    save_file({"a": np.ones(1, dtype=np.float32)}, os.path.join(mixed, "pytorch_lora_weights.safetensors"))
    with open(os.path.join(mixed, "training_config.json")) as handle:
        config = json.load(handle)
    config["train_method"] = "lora"
    with open(os.path.join(mixed, "training_config.json"), "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match="mixes outputs"):
        create_model_card(mixed)
    with pytest.raises(FileNotFoundError, match="training_config.json"):
        create_model_card(str(tmp_path))


# ---------------------------------------------------------------------------- the usage snippet runs
def _snippet(card_text: str) -> str:
    return re.search(r"```python\n(.*?)```", card_text, re.S).group(1)


@pytest.fixture(scope="module")
def tiny_sd_base(tmp_path_factory):
    from smpo_diffusers.testing import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd")), kind="sd", seed=0)


@pytest.mark.parametrize("layout", ["lora", "unet", "pipeline"])
def test_card_usage_snippet_runs_on_a_tiny_model(tmp_path, monkeypatch, tiny_sd_base, layout):
    import torch
    from diffusers import StableDiffusionPipeline

    from smpo_diffusers.models import add_lora_adapters, save_lora

    base = tiny_sd_base
    out = write_output_folder(tmp_path / "out", family="sd", layout=layout, checkpoints=False)
    for name in ("pytorch_lora_weights.safetensors", "unet", "model_index.json"):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    if layout == "lora":
        add_lora_adapters(pipe.unet, rank=2, alpha=2, target_modules=["to_q", "to_v"])
        save_lora(out, pipe.unet, is_sdxl=False)
    elif layout == "unet":
        pipe.unet.save_pretrained(os.path.join(out, "unet"))
    else:
        pipe.save_pretrained(out)
    card = create_model_card(out, repo_id="me/tiny")
    code = _snippet(card.text)
    assert ("me/tiny" in code) and (SD_BASE in code) == (layout != "pipeline")
    code = code.replace(json.dumps("me/tiny"), json.dumps(out)).replace(json.dumps(SD_BASE), json.dumps(base))
    code = code.replace("num_inference_steps=30", "num_inference_steps=2")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, "model-card-snippet", "exec"), {})
    with Image.open(tmp_path / "smpo-sample.png") as image:
        assert image.size == (32, 32)


# ---------------------------------------------------------------------------- command line
def test_command_line_uses_env_token_and_endpoint(tmp_path, stub_hub, monkeypatch, capsys):
    out = write_output_folder(tmp_path / "run")
    monkeypatch.setattr(hf_constants, "ENDPOINT", stub_hub.endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_main([out, "--hub_model_id", "org/cli", "--private", "--commit_message", "from the CLI",
                     "--license", "other", "--reward_model", "PickScore_v1"])
    assert capsys.readouterr().out.strip() == url
    assert stub_hub.repos["org/cli"]["visibility"] == "private"
    assert stub_hub.repos["org/cli"]["commits"][0]["summary"] == "from the CLI"
    assert "smpo_diffusers" in stub_hub.requests[0]["headers"]["user-agent"]
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.license == "other" and "| Reward model | PickScore_v1 |" in card.text

    # --no-private overrides the run's --hub_private (and its retry hint keeps it)
    private_run = write_output_folder(tmp_path / "private-run", push_to_hub=True, hub_private=True)
    stub_hub.fail["commit"] = 400
    with pytest.raises(SystemExit):
        push_main([private_run, "--hub_model_id", "org/public", "--no-private"])
    assert "--hub_model_id org/public --no-private" in capsys.readouterr().err
    del stub_hub.fail["commit"]
    push_main([private_run, "--hub_model_id", "org/public", "--no-private"])
    assert stub_hub.repos["org/public"]["visibility"] == "public"
    with pytest.raises(SystemExit) as exit_info:
        push_main([out, "--no_model_card", "--license", "mit"])
    assert exit_info.value.code == 2 and "--no_model_card writes none" in capsys.readouterr().err
    # --no_model_card uploads the folder's own README.md as written
    own_card = write_output_folder(tmp_path / "own-card")
    with open(os.path.join(own_card, "README.md"), "w") as handle:
        handle.write("# my own card\n")
    push_main([own_card, "--hub_model_id", "org/own-card", "--no_model_card"])
    assert stub_hub.repos["org/own-card"]["files"]["README.md"] == b"# my own card\n"

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SystemExit) as exit_info:
        push_main([out])
    assert exit_info.value.code == 2 and "hf auth login" in capsys.readouterr().err
    monkeypatch.setenv("SMPO_DEBUG", "1")
    with pytest.raises(HubAuthenticationError, match="hf auth login"):  # the traceback, on request
        push_main([out])
    monkeypatch.delenv("SMPO_DEBUG")
    with pytest.raises(SystemExit):
        push_main([out, "--hub_token", TOKEN])  # not a flag: tokens never go on the command line


def test_training_with_push_to_hub_uploads_the_final_output(tmp_path, stub_hub, monkeypatch, caplog, demo_inputs):
    """`--push_to_hub` end to end: real training, real card, real client, stopped at the loopback stub."""
    from smpo_diffusers import SmPOTrainer

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(hf_constants, "ENDPOINT", stub_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model, data = demo_inputs["sdxl"]
    out = tmp_path / "run"
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), resolution=32,
                        train_batch_size=2, max_train_steps=2, checkpointing_steps=1, report_to="tensorboard",
                        logging_dir="tb-runs", validation_prompts=["a red circle"], validation_num_inference_steps=2,
                        push_to_hub=True, hub_model_id="my-org/tiny-smpo", hub_private=True)
    SmPOTrainer(config).train()
    routes = [r["route"] for r in stub_hub.requests]
    # "info": before training, and again before uploading, a private push checks the repository is new or private
    assert routes[0] == "info" and routes.count("create") == routes.count("commit") == 1
    assert routes.index("create") < routes.index("info", 1) < routes.index("commit")
    assert stub_hub.repos["my-org/tiny-smpo"]["visibility"] == "private"
    if HUB_1:  # the exact requests of huggingface_hub >= 1.0 (older clients ask for more)
        assert routes == ["info", "create", "info", "validate-yaml", "preupload", "commit"]
        create = json.loads(stub_hub.requests[1]["body"])
        assert create == {"name": "tiny-smpo", "organization": "my-org", "visibility": "private"}
    assert sorted(stub_hub.repos["my-org/tiny-smpo"]["files"]) == [
        "README.md", "pytorch_lora_weights.safetensors", "training_config.json", "training_metrics.json",
        "validation.png"]
    card = ModelCard.load(str(out / "README.md"))
    assert {"smpo", "dpo", "lora", "text-to-image", "diffusers"} <= set(card.data.tags)
    assert card.data.library_name == "diffusers" and "validation.png" in card.text
    assert (out / "checkpoint-2").is_dir() and not (out / "logs").exists()  # kept locally, never uploaded
    saved = json.loads((out / "training_config.json").read_text())  # the card's record of what was local
    assert saved[hub.LOCAL_INPUTS] == ["pretrained_model_name_or_path", "dataset_name"]
    assert card.data.base_model is None and card.data.datasets is None and card.data.license == "other"
    assert any(name.startswith("events.out.tfevents") for _, _, names in os.walk(out / "tb-runs") for name in names)
    assert_token_in_no_file(out)
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_private_push_onto_a_public_repository_fails_before_training(
        tmp_path, stub_hub, monkeypatch, caplog, demo_inputs):
    from smpo_diffusers import SmPOTrainer

    monkeypatch.setattr(hf_constants, "ENDPOINT", stub_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    HfApi(endpoint=stub_hub.endpoint).create_repo("my-org/public", token=TOKEN)
    model, data = demo_inputs["sdxl"]
    options = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "o"),
                   resolution=32, report_to="none", push_to_hub=True, hub_private=True)
    with pytest.raises(ValueError, match="my-org/public already exists and is public.*nothing was trained"):
        SmPOTrainer(SmPOConfig(**options, hub_model_id="my-org/public"))
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()
    # a Hub that cannot answer (here: no whoami route for a bare name) is warned about, not a reason to refuse
    with caplog.at_level("WARNING", logger="smpo_diffusers.hub"):
        hub.check_private_push_target("bare-name", TOKEN)
    assert "could not check that bare-name is private or new before training" in caplog.text
    assert TOKEN not in caplog.text


def test_push_to_hub_without_a_token_fails_before_training(tmp_path, demo_inputs):
    from smpo_diffusers import SmPOTrainer

    model, data = demo_inputs["sdxl"]
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "o"),
                        resolution=32, report_to="none", push_to_hub=True, hub_model_id="me/x")
    with pytest.raises(hub.HubAuthenticationError, match="hf auth login"):
        SmPOTrainer(config)
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_card_for_a_folder_name_that_is_no_hub_id(tmp_path):
    out = write_output_folder(tmp_path / "SmPO (K=1) run")
    card = create_model_card(out)
    assert hub.PLACEHOLDER_REPO_ID in card.text


def test_card_leaves_out_a_validation_image_this_run_did_not_render(tmp_path):
    """A validation.png in a folder whose run had no --validation_prompts is an earlier run's: not embedded."""
    out = write_output_folder(tmp_path / "out", validation=False, checkpoints=False)
    Image.new("RGB", (16, 8), "red").save(os.path.join(out, "validation.png"))  # left by an earlier run
    assert "![validation]" not in create_model_card(out).text
    rendered = write_output_folder(tmp_path / "rendered", validation=True, checkpoints=False)
    assert "![validation](validation.png)" in create_model_card(rendered).text


def test_card_states_the_learning_rate_used_and_what_was_skipped(tmp_path):
    out = write_output_folder(tmp_path / "out", scale_lr=True)
    for name, update in (("training_config.json", {"effective_learning_rate": 1.6e-4}),
                         ("training_metrics.json", {"skipped": {"nonfinite_updates": 2, "empty_updates": 0,
                                                                "undecodable_pairs": 3, "empty_batches": 1}})):
        path = os.path.join(out, name)
        data = json.load(open(path)) | update
        json.dump(data, open(path, "w"))
    text = create_model_card(out).text
    assert "| Learning rate | 0.00016 (`learning_rate` 1e-05 × the effective batch size, `--scale_lr`); " in text
    assert ("Skipped during training: 2 updates skipped for a non-finite loss or gradient, 3 undecodable pairs."
            in text)
    plain = create_model_card(write_output_folder(tmp_path / "plain")).text
    assert "| Learning rate | 1e-05; constant schedule" in plain and "Skipped during training" not in plain


@pytest.mark.parametrize("loss_type,noise_source,says,never", [
    ("smpo", "inversion", "by SmPO-Diffusion (Smoothed Preference Optimization with ReNoise inversion)", "hard labels"),
    ("smpo", "random", "SmPO without its inversion", "obtained by inverting"),
    ("dpo", "inversion", "Diffusion-DPO objective on latents obtained by ReNoise inversion", "smoothed preference"),
    ("dpo", "random", "the Diffusion-DPO objective (the SmPO baseline)", "inverting the training images"),
])
def test_card_describes_the_objective_and_noise_the_run_used(tmp_path, loss_type, noise_source, says, never):
    overrides = dict(loss_type=loss_type, noise_source=noise_source)
    if noise_source == "random":
        overrides.update(num_inversion_steps=None)
    out = write_output_folder(tmp_path / "out", **overrides)
    text = create_model_card(out).text
    assert says in text and never not in text.split("## Training data")[0]


def test_card_takes_the_reward_model_only_from_statistics_of_the_trained_columns(tmp_path):
    from smpo_diffusers.rewards.statistics import save_reward_statistics

    data = tmp_path / "prefs"
    data.mkdir()
    save_reward_statistics(str(data), {"reward_model": "clip", "count": 2, "min": 0.0, "max": 1.0, "mean": 0.5,
                                       "std": 0.5, "suggested_scale": 1.0})  # describes reward_0/reward_1
    out = write_output_folder(tmp_path / "out", dataset_name=str(data))
    path = os.path.join(out, "training_config.json")
    config = json.load(open(path))
    assert "| Reward model | clip |" in create_model_card(out).text
    json.dump(config | {"reward_columns": ["ps_score_0", "ps_score_1"]}, open(path, "w"))
    assert "| Reward model | not recorded |" in create_model_card(out).text
    # what training recorded wins, wherever the dataset folder is now (the card may be written from anywhere)
    json.dump(config | {"reward_model": "hpsv2", "dataset_name": "moved-away"}, open(path, "w"))
    assert "| Reward model | hpsv2 |" in create_model_card(out).text
    json.dump(config | {"reward_model": "/home/someone/rewards/my-reward"}, open(path, "w"))  # a local checkpoint
    text = create_model_card(out).text
    assert "| Reward model | my-reward |" in text and "/home/someone" not in text
    for relative in ("../../alice/ckpts/rm", "ckpts/alice/rm"):
        json.dump(config | {"reward_model": relative}, open(path, "w"))
        assert "| Reward model | rm |" in create_model_card(out).text
    json.dump(config | {"reward_model": "yuvalkirstain/PickScore_v1"}, open(path, "w"))  # a Hub id stays whole
    assert "| Reward model | yuvalkirstain/PickScore_v1 |" in create_model_card(out).text
    json.dump(config | {"reward_model": "../../alice/ckpts/rm"}, open(path, "w"))  # the upload names it as the card
    with hub._staged_upload(out, ["training_config.json"]) as staging:
        assert json.load(open(os.path.join(staging, "training_config.json")))["reward_model"] == "rm"


def test_card_mentions_a_local_vae_the_snippet_cannot_name(tmp_path):
    vae = tmp_path / "private" / "my-fp16-fix-vae"
    vae.mkdir(parents=True)
    text = create_model_card(write_output_folder(tmp_path / "out", pretrained_vae_model_name_or_path=str(vae))).text
    assert "separate VAE from a local folder named `my-fp16-fix-vae`" in text and str(tmp_path) not in text
    hub_out = write_output_folder(tmp_path / "hub", pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix")
    hub_vae = create_model_card(hub_out).text
    assert 'AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix"' in hub_vae and "local folder" not in hub_vae


def test_card_snippet_loads_the_base_at_the_revision_and_variant_training_read(tmp_path, monkeypatch):
    """A run on revision v1 (ema weight files) of a Hub base: the card's snippet passes revision= and variant=, and
    run as written (offline, from a Hub cache) it loads that snapshot's weights. A Hub-cache snapshot folder given
    as the base path names its commit."""
    import torch
    from diffusers import StableDiffusionPipeline

    from smpo_diffusers.hub import base_revision
    from smpo_diffusers.models import add_lora_adapters, save_lora
    from smpo_diffusers.testing import add_to_hub_cache, save_tiny_pipeline

    cache, repo_id, v1_commit = str(tmp_path / "hub-cache"), "someone/tiny-sd", "b" * 40
    add_to_hub_cache(save_tiny_pipeline(str(tmp_path / "main"), kind="sd", seed=0), cache, repo_id, "a" * 40)
    StableDiffusionPipeline.from_pretrained(save_tiny_pipeline(str(tmp_path / "v1"), kind="sd", seed=1)
                                            ).save_pretrained(str(tmp_path / "v1-ema"), variant="ema")
    snapshot = add_to_hub_cache(str(tmp_path / "v1-ema"), cache, repo_id, v1_commit, refs=("v1",))
    out = write_output_folder(tmp_path / "out", family="sd", layout="lora", validation=False, checkpoints=False,
                              pretrained_model_name_or_path=repo_id, revision="v1", variant="ema")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "v1"), safety_checker=None)
    add_lora_adapters(pipe.unet, rank=2, alpha=2, target_modules=["to_q", "to_v"])
    save_lora(out, pipe.unet, is_sdxl=False)
    code = _snippet(create_model_card(out, repo_id="me/tiny").text)
    assert 'revision="v1", variant="ema"' in code
    code = code.replace(json.dumps("me/tiny"), json.dumps(out)).replace("num_inference_steps=30",
                                                                        "num_inference_steps=2")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", cache)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "model-card-snippet", "exec"), scope)
    wanted = StableDiffusionPipeline.from_pretrained(str(tmp_path / "v1")).vae.state_dict()
    assert all(torch.equal(scope["pipeline"].vae.state_dict()[name], value) for name, value in wanted.items())

    assert base_revision({"pretrained_model_name_or_path": snapshot}) == v1_commit
    assert base_revision({"pretrained_model_name_or_path": snapshot, "revision": "v1"}) == v1_commit  # as read
    missing = snapshot.replace(v1_commit, "c" * 40)  # a pruned cache: the path still names its commit
    assert base_revision({"pretrained_model_name_or_path": missing}) == "c" * 40
    assert base_revision({"pretrained_model_name_or_path": repo_id}) is None
    out_snapshot = write_output_folder(tmp_path / "snap", family="sd", layout="lora", validation=False,
                                       checkpoints=False, pretrained_model_name_or_path=snapshot)
    assert f'revision="{v1_commit}"' in _snippet(create_model_card(out_snapshot, repo_id="me/tiny").text)


# ---------------------------------------------------------------------------- audit fixes
def _chain(error):
    """``error`` and every exception it chains (causes and contexts)."""
    seen, pending = [], [error]
    while pending:
        item = pending.pop()
        if item is not None and all(item is not other for other in seen):
            seen.append(item)
            pending += [item.__cause__, item.__context__]
    return seen


def _shows_token(error) -> bool:
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return TOKEN in text or any(TOKEN in str(item) or TOKEN in repr(item.args) for item in _chain(error))


def test_a_token_with_a_trailing_newline_is_stripped_and_never_shown(tmp_path, stub_hub, monkeypatch, capsys,
                                                                     caplog):
    """HF_TOKEN from an env file or a mounted secret ends with a newline: sent stripped, and no error, cause,
    log record or stderr line shows it (an HTTP client's 'Illegal header value' quotes it escaped)."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
    assert check_hub_credentials() == TOKEN and check_hub_credentials(f" {TOKEN}\r\n") == TOKEN
    out = write_output_folder(tmp_path / "run")
    push_to_hub(out, "me/newline", api=HfApi(endpoint=stub_hub.endpoint))
    assert stub_hub.repos["me/newline"]["files"] and stub_hub.requests
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in stub_hub.requests)

    stub_hub.fail["commit"] = 400
    with pytest.raises(HubUploadError) as error:
        push_to_hub(out, "me/newline", api=HfApi(endpoint=stub_hub.endpoint))
    assert not _shows_token(error.value)
    monkeypatch.setattr(hf_constants, "ENDPOINT", stub_hub.endpoint)
    with pytest.raises(SystemExit) as exit_info:
        push_main([out, "--hub_model_id", "me/newline"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: Uploading" in err and TOKEN not in err
    # the pre-training check, handed the raw token: its warning (the Hub could not be asked) shows no token
    with caplog.at_level("WARNING", logger="smpo_diffusers.hub"):
        hub.check_private_push_target("bare-name", TOKEN + "\n")
    assert "could not check that bare-name" in caplog.text
    assert TOKEN not in caplog.text and not any(TOKEN in record.getMessage() for record in caplog.records)
    # a token broken inside cannot be sent at all: refused up front, without showing it
    monkeypatch.setenv("HF_TOKEN", f"{TOKEN[:8]}\n{TOKEN[8:]}")
    with pytest.raises(HubAuthenticationError, match="line breaks") as refused:
        check_hub_credentials()
    assert TOKEN[8:] not in str(refused.value)


def test_redaction_covers_escaped_and_stripped_forms_and_the_error_chain(tmp_path):
    raw = TOKEN + "\n"
    for text in (f"Illegal header value b'Bearer {TOKEN}\\n'", repr(f"Bearer {raw}"), repr(f"Bearer {raw}".encode()),
                 f"Bearer {TOKEN}", f"Bearer {raw}"):
        assert TOKEN not in redact(text, raw) and TOKEN not in redact(text, TOKEN), text

    class LeakyApi:  # a client whose error quotes the header it refused, the way httpx does
        def create_repo(self, *args, **kwargs):
            try:
                raise ConnectionError(f"sent {TOKEN!r}")
            except ConnectionError as inner:
                raise RuntimeError(f"Illegal header value {('Bearer ' + raw).encode()!r}") from inner

    out = write_output_folder(tmp_path / "run")
    with pytest.raises(HubUploadError, match=r"Illegal header value b'Bearer \*\*\*") as error:
        push_to_hub(out, "me/x", token=TOKEN, api=LeakyApi())
    assert not _shows_token(error.value)


def test_cli_reports_hub_errors_in_one_line(tmp_path, capsys):
    """The training CLI: no token for --push_to_hub (and a failed push) is an `error:` line and status 2, like other
    bad input, never a traceback with the client's chained error."""
    from smpo_diffusers.cli import run_cli, train_main

    argv = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/x", "--report_to", "none"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: No Hugging Face token") and "Traceback" not in err

    def failed_push():
        try:
            raise RuntimeError(f"client error quoting Bearer {TOKEN}")
        except RuntimeError as cause:
            raise HubUploadError("Uploading out failed (RuntimeError: client error quoting Bearer ***).") from cause

    with pytest.raises(SystemExit) as exit_info:
        run_cli(failed_push)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: Uploading out failed") and TOKEN not in err


def test_card_metadata_uses_what_the_run_recorded_as_local(tmp_path, monkeypatch):
    """Relative --pretrained_model_name_or_path/--dataset_name folders: the card written from another directory
    still leaves them out of the metadata (they are not Hub ids), and Hub ids stay Hub ids wherever it runs."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    for folder in (work / "my-sdxl-base", work / "pickapic-labelled", elsewhere / "yuvalkirstain" / "pickapic_v2"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = write_output_folder(work / "run", pretrained_model_name_or_path="my-sdxl-base",
                              dataset_name="pickapic-labelled")
    path = os.path.join(out, "training_config.json")
    config = json.load(open(path))
    assert hub.local_input_names(config) == ["pretrained_model_name_or_path", "dataset_name"]  # what the run saves
    json.dump(config | {hub.LOCAL_INPUTS: hub.local_input_names(config)}, open(path, "w"))
    monkeypatch.chdir(elsewhere)
    card = create_model_card(out)
    assert card.data.base_model is None and card.data.datasets is None and card.data.license == "other"
    assert "`my-sdxl-base`" in card.text and "`pickapic-labelled`" in card.text

    hub_run = write_output_folder(tmp_path / "hub-run")  # Hub ids, recorded as such; a same-named folder here
    path = os.path.join(hub_run, "training_config.json")
    json.dump(json.load(open(path)) | {hub.LOCAL_INPUTS: []}, open(path, "w"))
    assert create_model_card(hub_run).data.datasets == [PICKAPIC]
    # a training_config.json written before the record: decided from the current directory, as before
    old = write_output_folder(tmp_path / "old", pretrained_model_name_or_path="my-sdxl-base")
    assert create_model_card(old).data.base_model == "my-sdxl-base"


def test_license_is_asserted_only_for_known_public_bases(tmp_path):
    for family, base, expected in (("sdxl", SDXL_BASE, "openrail++"), ("sd", SD_BASE, "creativeml-openrail-m"),
                                   ("sd", "stabilityai/stable-diffusion-2-1-base", "openrail++"),
                                   ("sdxl", "someone/sdxl-anime-finetune", "other"),
                                   ("sd", "someone/stable-diffusion-2-nsfw-finetune", "other")):
        out = write_output_folder(tmp_path / base.replace("/", "--"), family=family,
                                  pretrained_model_name_or_path=base)
        card = create_model_card(out)
        assert card.data.license == expected, base
        assert ("must state the base model's license" in card.text) == (expected == "other"), base
    stated = create_model_card(out, license="apache-2.0")
    assert stated.data.license == "apache-2.0" and "## License" not in stated.text


def test_a_failed_push_leaves_the_local_card_as_it_was(tmp_path, stub_hub):
    out = write_output_folder(tmp_path / "run")
    api = HfApi(endpoint=stub_hub.endpoint)
    stub_hub.fail["commit"] = 400
    with pytest.raises(HubUploadError):
        push_to_hub(out, "me/first", token=TOKEN, api=api)
    assert not os.path.exists(os.path.join(out, "README.md"))  # the card went into the staging folder only
    create_model_card(out, repo_id="me/old")
    before = snapshot(out)
    with pytest.raises(HubUploadError, match="intact"):
        push_to_hub(out, "me/first", token=TOKEN, api=api)
    assert snapshot(out) == before
    del stub_hub.fail["commit"]
    push_to_hub(out, "me/first", token=TOKEN, api=api)
    local = open(os.path.join(out, "README.md"), "rb").read()
    assert local == stub_hub.repos["me/first"]["files"]["README.md"] and b"me/first" in local


def test_stale_staging_folders_are_removed_and_never_uploaded(tmp_path, stub_hub):
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    out = write_output_folder(tmp_path / "run")
    stale = [f".hub-upload-{finished.pid}-k1ll3d.tmp", ".hub-upload-oldformat.tmp"]
    for name in stale:
        os.makedirs(os.path.join(out, name, "unet"))
        for relative in ("pytorch_lora_weights.safetensors", "README.md", "unet/config.json"):
            open(os.path.join(out, name, relative), "w").write("stale")
    assert not any(".hub-upload-" in path for path in release_files(out))
    push_to_hub(out, "me/clean", token=TOKEN, api=HfApi(endpoint=stub_hub.endpoint))
    assert set(stub_hub.repos["me/clean"]["files"]) == LORA_RELEASE
    assert not [name for name in os.listdir(out) if name.startswith(".hub-upload-")]


def _stop_init(monkeypatch, seen):
    """Make the private-target check record the repository id it is asked about and stop the trainer there."""
    class Stop(Exception):
        pass

    def check(repo_id, token, api=None):
        seen.append(repo_id)
        raise Stop

    monkeypatch.setattr(hub, "check_private_push_target", check)
    return Stop


def test_push_target_of_a_training_run_is_checked_before_training(tmp_path, monkeypatch, demo_inputs):
    """--push_to_hub without --hub_model_id: the folder name must be a valid id (checked before training), and the
    private pre-check asks about that name, not the hub_model_id an earlier run's training_config.json records."""
    from smpo_diffusers import SmPOTrainer

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model, data = demo_inputs["sdxl"]
    options = dict(pretrained_model_name_or_path=model, dataset_name=data, resolution=32, report_to="none",
                   push_to_hub=True)
    bad = tmp_path / "sdxl lora (K=1)"
    with pytest.raises(ValueError, match=r"output_dir folder's name.*pass --hub_model_id your-name/model-name.*"
                                         r"nothing was trained"):
        SmPOTrainer(SmPOConfig(**options, output_dir=str(bad)))
    assert not (bad / "pytorch_lora_weights.safetensors").exists()

    reused = write_output_folder(tmp_path / "next-run", push_to_hub=True, hub_model_id="old-org/old-model")
    seen = []
    stopped = _stop_init(monkeypatch, seen)
    with pytest.raises(stopped):
        SmPOTrainer(SmPOConfig(**options, output_dir=reused, hub_private=True))
    with pytest.raises(stopped):
        SmPOTrainer(SmPOConfig(**options, output_dir=reused, hub_private=True, hub_model_id="team/chosen"))
    assert seen == ["next-run", "team/chosen"]


def test_a_hand_written_readme_stops_a_push_to_hub_run_before_training(tmp_path, monkeypatch, demo_inputs):
    from smpo_diffusers import SmPOTrainer

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model, data = demo_inputs["sdxl"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), resolution=32,
                        report_to="none", push_to_hub=True, hub_model_id="me/x")
    with pytest.raises(FileExistsError, match=r"--push_to_hub uploads a generated model card in its place.*"
                                              r"without --push_to_hub.*--no_model_card`; nothing was trained"):
        SmPOTrainer(config)
    assert (out / "README.md").read_text() == "# my notes\n"


def test_a_push_failing_after_training_says_the_weights_are_saved(tmp_path, stub_hub, monkeypatch):
    """The push at the end of train() (here on a trainer without its models: only the push runs): any failure
    says the weights are saved and gives the command that pushes them alone."""
    from smpo_diffusers import SmPOTrainer

    monkeypatch.setattr(hf_constants, "ENDPOINT", stub_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def trainer_for(folder, **overrides):
        out = write_output_folder(folder, push_to_hub=True, **overrides)
        trainer = object.__new__(SmPOTrainer)
        trainer.config = SmPOConfig(output_dir=out, push_to_hub=True, **overrides)
        trainer.reward_statistics = None
        return trainer, out

    trainer, out = trainer_for(tmp_path / "renamed (K=1)")  # e.g. a subclass that changed output_dir
    with pytest.raises(HubUploadError) as error:
        trainer._push_trained_output()
    message = str(error.value)
    assert f"trained weights are saved in {out}" in message and "is not a valid Hub repository id" in message
    assert "python examples/push_to_hub.py" in message and "--hub_model_id your-name/model-name" in message

    trainer, out = trainer_for(tmp_path / "run", hub_model_id="me/run", hub_private=True)
    stub_hub.fail["commit"] = 400
    with pytest.raises(HubUploadError) as error:
        trainer._push_trained_output()
    message = str(error.value)
    assert f"trained weights are saved in {out}" in message and TOKEN not in message
    assert f"python examples/push_to_hub.py {out} --hub_model_id me/run --private" in message
