"""Safe by default: loopback, tokens, no server-side paths unless allowed (and then only inside), limits, CORS."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from serve_helpers import b64, png_bytes, wait_for

from difftool.core.errors import ParameterError
from difftool.serve.settings import ServeSettings

TOKEN = "s3cret-token-0123"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_needs_nothing(host: str) -> None:
    assert ServeSettings(host=host).check().host == host


def test_other_addresses_need_a_token_or_insecure() -> None:
    with pytest.raises(ParameterError, match="--api-token TOKEN.*--insecure"):
        ServeSettings(host="0.0.0.0").check()
    ServeSettings(host="0.0.0.0", api_token=TOKEN).check()
    ServeSettings(host="192.168.1.5", insecure=True).check()
    with pytest.raises(ParameterError, match="shorter than 8"):
        ServeSettings(api_token="abc").check()


def test_the_command_refuses_an_open_bind_in_one_line() -> None:
    from difftool import cli

    result = CliRunner().invoke(cli.cli, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "--api-token" in result.stderr
    assert "Traceback" not in result.output


def test_every_route_needs_the_token(make_client: Any) -> None:
    client = make_client(api_token=TOKEN)
    routes = [("GET", "/v1/tasks"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/sdapi/v1/options"),
              ("POST", "/sdapi/v1/interrupt"), ("DELETE", "/v1/jobs/x")]  # fmt: skip
    for method, path in routes:
        response = client.request(method, path)
        assert response.status_code == 401 and "API token" in response.json()["error"], path
        wrong = client.request(method, path, headers={"Authorization": "Bearer nope-nope-nope"})
        assert wrong.status_code == 401
    assert client.get("/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as closed:  # WebSockets too (policy violation)
        with client.websocket_connect("/v1/jobs/x/events"):
            pass
    assert closed.value.code == 1008
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()  # webuiapi's set_auth(username, password)
    assert client.get("/sdapi/v1/options", headers={"Authorization": f"Basic {basic}"}).status_code == 200


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "in.png").write_bytes(png_bytes())
    (allowed / "sub").mkdir()
    (outside / "secret.png").write_bytes(png_bytes(seed=2))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    return {"allowed": allowed, "outside": outside}


def _job(client: Any, path: str) -> Any:
    return client.post("/v1/jobs", json={"task": "posterize", "inputs": [{"path": path}]})


def test_no_server_paths_by_default(make_client: Any, folders: dict[str, Path]) -> None:
    client = make_client()
    response = _job(client, str(folders["allowed"] / "in.png"))
    assert response.status_code == 403 and "accepts no server-side paths" in response.json()["error"]


def test_allowed_paths_only_inside_the_folder(make_client: Any, folders: dict[str, Path]) -> None:
    allowed, outside = folders["allowed"], folders["outside"]
    client = make_client(allow_paths=(allowed,))
    for ok in ("in.png", str(allowed / "in.png"), "sub/../in.png"):
        response = _job(client, ok)
        assert response.status_code == 202, response.text
        assert wait_for(client, response.json()["id"])["state"] == "done"
    escapes = ["../outside/secret.png", str(outside / "secret.png"), "link.png", "linkdir/secret.png",
               f"{allowed}/../outside/secret.png", "/etc/passwd", "missing.png"]  # fmt: skip
    for escape in escapes:
        response = _job(client, escape)
        assert response.status_code == 403, (escape, response.text)
        assert set(response.json()) == {"error"}
        if "link" in escape:  # the refusal does not tell where the link points
            assert str(outside) not in response.json()["error"]


def test_model_names_resolve_only_among_known_models(make_client: Any, folders: dict[str, Path], model_root) -> None:
    client = make_client()
    body = {"task": "generate", "params": {"prompt": "x", "steps": 1, "width": 16, "height": 16}}
    response = client.post("/v1/jobs", json={**body, "model": str(model_root / "tiny-sd")})
    assert response.status_code == 422 and "not one of this server's models" in response.json()["error"]
    assert client.post("/v1/jobs", json={**body, "model": "tiny-sd"}).status_code == 202
    allowing = make_client(allow_paths=(folders["allowed"],))
    response = allowing.post("/v1/jobs", json={**body, "model": str(model_root / "tiny-sd")})
    assert response.status_code == 403 and "outside the folders" in response.json()["error"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"vae": "/etc"}, "accepts no server-side paths"),
        ({"lora": "/etc/passwd:0.5"}, "not one of this server's models"),
        ({"allow_pickle": True}, "never unpickles"),
        ({"embedding": "/etc/passwd"}, "accepts no server-side paths"),
        ({"hires": 2.0, "hires_upscaler": "/etc/passwd"}, "not one of this server's models"),
        ({"control": ["/etc/passwd=x.png"]}, "not one of this server's models"),
        ({"control": [{"model": "/etc/cn.safetensors"}]}, "not one of this server's models"),
    ],
)
def test_file_parameters_are_checked(make_client: Any, model_root: Path, params: dict, message: str) -> None:
    body = {"task": "generate", "model": "tiny-sd", "params": {"prompt": "x", **params}}
    response = make_client().post("/v1/jobs", json=body)
    assert response.status_code in (403, 422) and message in response.json()["error"]


def test_request_size_and_pixel_limits(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client(max_body_bytes=4096)
    big = {"task": "posterize", "inputs": [b64(os.urandom(8000))]}
    response = client.post("/v1/jobs", json=big)
    assert response.status_code == 413 and "larger than 4096 bytes" in response.json()["error"]

    def chunks() -> Any:  # no Content-Length: the limit is counted as the body streams in
        yield b'{"task": "posterize", "inputs": ["'
        for _ in range(10):
            yield b"A" * 1000
        yield b'"]}'

    response = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]
    monkeypatch.setenv("DIFFTOOL_MAX_PIXELS", "100")
    response = client.post("/v1/jobs", json={"task": "posterize", "inputs": [b64(png_bytes(20, 16))]})
    assert response.status_code == 413 and "DIFFTOOL_MAX_PIXELS" in response.json()["error"]


def test_cors_is_off_unless_asked(make_client: Any) -> None:
    origin = {"Origin": "https://paint.example"}
    assert "access-control-allow-origin" not in make_client().get("/v1/tasks", headers=origin).headers
    client = make_client(cors_origins=("https://paint.example",))
    assert client.get("/v1/tasks", headers=origin).headers["access-control-allow-origin"] == "https://paint.example"
    other = client.get("/v1/tasks", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_upscale_sd_upscaler_names_a_listed_model_or_a_keyword(make_client: Any, model_root: Path) -> None:
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    inputs = {"image": base64.b64encode(png.getvalue()).decode()}
    body = {"task": "upscale-sd", "model": "tiny-sd", "inputs": inputs, "params": {"upscaler": "/etc/passwd"}}
    response = make_client().post("/v1/jobs", json=body)
    assert response.status_code in (403, 422) and "not one of this server's models" in response.json()["error"]


def test_records_name_models_without_the_servers_paths(make_client: Any, model_root: Path) -> None:
    from serve_helpers import b64, png_bytes, wait_for

    client = make_client()
    body = {"task": "style", "model": "tiny-sd", "inputs": [b64(png_bytes(16, 16))], "seed": 1}
    body["params"] = {"prompt": "ink /not/a/path", "steps": 2}
    status = wait_for(client, client.post("/v1/jobs", json=body).json()["id"])
    assert status["state"] == "done", status
    record = status["records"][0]
    assert record["model"] == "tiny-sd" and record["prompt"] == "ink /not/a/path"  # prompts are left as written
    text = client.get(f"/v1/jobs/{status['id']}/result").content
    assert str(model_root).encode() not in text and str(model_root) not in json.dumps(status)
    job = client.app.state.server.queue.get(status["id"])
    assert job.inputs == [] and job.preview is None  # a kept job holds its status and files, not its inputs


def test_a1111_sizes_are_bounded_before_anything_is_allocated(make_client: Any, model_root: Path) -> None:
    from serve_helpers import b64, png_bytes

    body = {"init_images": [b64(png_bytes(1, 1))], "width": 100_000, "height": 100_000, "prompt": "x"}
    response = make_client().post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422 and "width" in response.json()["error"]


def _listing(*entries: Any) -> Any:
    """A registry (no plugins) whose model sources list exactly ``entries``."""
    from difftool.plugins.registry import Registry

    class Listing(Registry):
        def find_models(self) -> list[Any]:
            return list(entries)

    return Listing()


def test_control_units_name_listed_controlnets_and_images_inside_allowed_folders(tmp_path: Path) -> None:
    """The server decodes a unit's inline image; the unit's own parser reads its text and the preflight's
    resolver (the path policy) resolves its model and image: the server parses no unit syntax itself."""
    from difftool.core.models import ModelEntry
    from difftool.core.params import resolve_value
    from difftool.plugins.builtin.sd.tasks import Generate
    from difftool.serve.security import AccessDenied, PathPolicy, PolicyResolver, check_params

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "edges.png").write_bytes(png_bytes(8, 8))
    (outside / "secret.png").write_bytes(png_bytes(8, 8))
    cn = tmp_path / "cn.safetensors"
    registry = _listing(ModelEntry("cn", cn, "sd1-controlnet", "test"), ModelEntry("sd", cn, "sd1", "test"))
    policy, param = PathPolicy((allowed,)), Generate.param("control")

    def resolved(units: list[Any], policy: PathPolicy = policy) -> tuple[Any, ...]:
        sent = check_params(Generate(), {"control": units}, registry, policy)["control"]
        return resolve_value(param, param.validate(sent), PolicyResolver(registry, policy))

    (unit,) = resolved(["cn=edges.png,weight=0.5"])
    assert unit.model.path == cn and unit.model == "cn" and unit.weight == 0.5  # records show the name as sent
    assert unit.image == (allowed / "edges.png").resolve()
    (inline,) = resolved([{"model": "cn", "image": b64(png_bytes(8, 8))}])
    assert inline.model.path == cn and inline.image.shape == (8, 8, 3)
    with pytest.raises(AccessDenied, match="outside the folders"):
        resolved([f"cn={outside / 'secret.png'}"])
    with pytest.raises(ParameterError, match="not one of this server's models"):  # a checkpoint is no ControlNet
        resolved(["sd=edges.png"], PathPolicy(()))


def test_a_plugin_tasks_own_model_parameter_is_under_the_path_policy(make_client: Any, tmp_path: Path) -> None:
    """The policy goes by parameter kind: a plugin's model parameter, whatever its name, resolves among the
    listed models of its families or inside an --allow-path folder, never anywhere else on the server."""
    from difftool.core.images import to_pil
    from difftool.core.task import Param, Task, TaskResult
    from difftool.plugins.hookspecs import hookimpl
    from difftool.plugins.registry import build_registry

    seen: list[Any] = []

    class Weighted(Task):
        name, summary = "weighted", "a plugin task with its own model parameter"
        params = (Param("weights", "model", families=("upscaler",), keywords=("none",)),)

        def run(self, request: Any, context: Any) -> TaskResult:
            seen.append(request.params["weights"])
            return TaskResult([to_pil(request.inputs["image"].rgb)])

    class Plugin:
        @hookimpl
        def register_tasks(self, register: Any) -> None:
            register(Weighted)

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    for folder in (allowed, outside):
        (folder / "w.pth").write_bytes(b"weights")
    client = make_client(registry=build_registry([Plugin()], entry_points=False), allow_paths=(allowed,))

    def post(weights: str) -> Any:
        body = {"task": "weighted", "inputs": [b64(png_bytes(8, 8))], "params": {"weights": weights}}
        return client.post("/v1/jobs", json=body)

    for escape in (str(outside / "w.pth"), "../outside/w.pth"):
        response = post(escape)
        assert response.status_code == 403 and "outside the folders" in response.json()["error"], response.text
    assert post("nonexistent-name").status_code == 422
    response = post("w.pth")  # inside the allowed folder: resolved there
    assert response.status_code == 202, response.text
    assert wait_for(client, response.json()["id"])["state"] == "done"
    assert seen[-1] == "w.pth" and seen[-1].path == (allowed / "w.pth").resolve()
    assert post("none").status_code == 202  # a keyword names no model
