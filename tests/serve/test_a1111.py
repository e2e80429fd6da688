"""The A1111 ``/sdapi/v1`` subset, driven by the real ``webuiapi`` client against a live server on loopback.

Every image is compared with ``difftool.run`` in-process: same seed and parameters, same pixels.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

import difftool
from difftool.plugins.registry import Registry

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def api(live_server: str) -> Any:
    host, port = live_server.split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_matches_difftool_run(api: Any, serve_registry: Registry) -> None:
    result = api.txt2img(
        prompt="a red cube", negative_prompt="fog", seed=11, steps=3, cfg_scale=6.5, width=32, height=24,
        sampler_name="Euler a", batch_size=2,
    )  # fmt: skip
    assert len(result.images) == 2 and result.info["all_seeds"] == [11, 12]
    for image, seed in zip(result.images, (11, 12), strict=True):
        expected = difftool.run(
            "generate", model="tiny-sd", prompt="a red cube", negative_prompt="fog", seed=seed, steps=3,
            guidance_scale=6.5, width=32, height=24, scheduler="euler-a", registry=serve_registry,
        )  # fmt: skip
        assert np.array_equal(pixels(image), pixels(expected.image))
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))
    # The PNG carries the CLI's metadata: A1111 infotext (Sampler: Euler a) and the difftool record.
    assert "Sampler: Euler a" in result.images[0].info["parameters"] and "Seed: 11" in result.info["infotexts"][0]
    assert json.loads(result.images[0].info["difftool"])["scheduler"] == "euler-a"


def test_img2img_is_style_with_the_same_pixels(api: Any, picture: Image.Image, serve_registry: Registry) -> None:
    result = api.img2img(
        images=[picture], prompt="a watercolor", denoising_strength=0.6, seed=5, steps=4, width=32, height=24,
        sampler_name="DDIM", cfg_scale=5.0,
    )  # fmt: skip
    expected = difftool.run(
        "style", picture, model="tiny-sd", prompt="a watercolor", strength=0.6, seed=5, steps=4, scheduler="ddim",
        guidance_scale=5.0, registry=serve_registry,
    )  # fmt: skip
    assert result.image.size == (32, 24)
    assert np.array_equal(pixels(result.image), pixels(expected.image))


def test_img2img_with_a_refiner_is_style_finished_by_the_refiner(
    api: Any, picture: Image.Image, serve_registry: Registry
) -> None:
    """A1111's ``refiner_checkpoint``/``refiner_switch_at`` on img2img (webuiapi has no such fields: raw JSON)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    body = {
        "init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "a watercolor", "seed": 5,
        "denoising_strength": 0.7, "steps": 6, "cfg_scale": 5.0, "width": 32, "height": 24, "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}, "refiner_checkpoint": "tiny-refiner [0123]",
        "refiner_switch_at": 0.6,
    }  # fmt: skip
    response = api.session.post(f"{api.baseurl}/img2img", json=body)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    expected = difftool.run(
        "style", picture, model="tiny-sdxl", refiner="tiny-refiner", refiner_switch=0.6, prompt="a watercolor",
        strength=0.7, seed=5, steps=6, scheduler="euler", guidance_scale=5.0, registry=serve_registry,
    )  # fmt: skip
    assert np.array_equal(pixels(image), pixels(expected.image))
    assert "Refiner: tiny-refiner [" in json.loads(response.json()["info"])["infotexts"][0]
    mask = Image.new("L", picture.size, 255)
    masked = io.BytesIO()
    mask.save(masked, format="PNG")
    refused = api.session.post(
        f"{api.baseurl}/img2img", json={**body, "mask": base64.b64encode(masked.getvalue()).decode()}
    )
    assert refused.status_code == 422 and "not inpainting" in refused.text


def test_inpaint_with_mask_matches_and_keeps_the_rest(api: Any, picture: Image.Image, serve_registry: Registry) -> None:
    hole = np.zeros((24, 32), np.uint8)
    hole[6:16, 8:24] = 255
    mask = Image.fromarray(hole)
    result = api.img2img(
        images=[picture], mask_image=mask, prompt="a window", denoising_strength=1.0, inpainting_fill=1,
        inpaint_full_res=False, mask_blur=0, seed=9, steps=3, width=32, height=24, sampler_name="DDIM",
        override_settings={"sd_model_checkpoint": "tiny-sd-inpaint"},
    )  # fmt: skip
    expected = difftool.run(
        "inpaint", picture, model="tiny-sd-inpaint", mask=mask, prompt="a window", strength=1.0, feather=0,
        seed=9, steps=3, scheduler="ddim", registry=serve_registry,
    )  # fmt: skip
    got = pixels(result.image)
    assert np.array_equal(got, pixels(expected.image))
    assert np.array_equal(got[hole == 0], pixels(picture)[hole == 0])
    assert not np.array_equal(got[hole > 0], pixels(picture)[hole > 0])


def test_extra_single_image_upscales_like_superres(api: Any, picture: Image.Image, serve_registry: Registry) -> None:
    names = [u["name"] for u in api.get_upscalers()]
    assert names[:2] == ["None", "difftool"]
    small = picture.crop((0, 0, 16, 12))
    result = api.extra_single_image(image=small, upscaler_1="difftool", upscaling_resize=2)
    record = json.loads(result.image.info["difftool"])
    assert result.image.size == (32, 24) and record["scale"] == 2
    expected = difftool.run("superres", small, scale=2, seed=record["seed"], registry=serve_registry)
    assert np.array_equal(pixels(result.image), pixels(expected.image))
    with pytest.raises(RuntimeError, match="upscaling_resize"):
        api.extra_single_image(image=small, upscaler_1="difftool", upscaling_resize=2.5)


def test_interrupt_stops_the_running_job_within_one_step(api: Any, live_server: str) -> None:

    failure: list[BaseException] = []

    def generate() -> None:
        try:
            api.txt2img(prompt="x", seed=1, steps=500, width=16, height=16, sampler_name="Euler")
        except RuntimeError as error:
            failure.append(error)

    api.set_options({"show_progress_every_n_steps": 2})  # live previews in /progress, as A1111's option
    thread = threading.Thread(target=generate)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while (progress := api.get_progress())["current_image"] is None:
            assert time.monotonic() < deadline and thread.is_alive(), "the job never sent a preview"
            time.sleep(0.01)
    finally:
        api.set_options({"show_progress_every_n_steps": 0})
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (16, 16) and progress["state"]["sampling_step"] >= 2
    assert progress["state"]["job"] == "generate"  # the task, never the job's id (issue 29 item 5)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 500
    started = time.monotonic()
    api.interrupt()
    thread.join(60)
    assert time.monotonic() - started < 30  # hundreds of steps were left: it stopped at the next one
    assert failure and "interrupted" in str(failure[0]) and "409" in str(failure[0])
    assert api.get_progress()["progress"] == 0  # idle again, and the server keeps serving:
    assert len(api.txt2img(prompt="y", seed=2, steps=1, width=16, height=16).images) == 1


def test_models_samplers_and_options(api: Any) -> None:
    assert {"tiny-sd", "tiny-sd-inpaint"} <= set(api.util_get_model_names())
    samplers = {s["name"]: s["aliases"] for s in api.get_samplers()}
    assert samplers["Euler a"] == ["euler-a"] and samplers["DPM++ 2M Karras"] == ["dpmpp-2m-karras"]
    assert api.util_get_current_model() == "tiny-sd"
    api.util_set_model("tiny-sd-inpaint", find_closest=False)
    try:
        assert api.get_options()["sd_model_checkpoint"] == "tiny-sd-inpaint"
    finally:
        api.set_options({"sd_model_checkpoint": "tiny-sd"})
    response = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert response.status_code == 422 and "unknown checkpoint" in response.json()["error"]
    response = api.session.post(f"{api.baseurl}/options", json={"sd_vae": "x.safetensors"})
    assert response.status_code == 422 and "sd_vae" in response.json()["error"]
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd"


def test_what_cannot_be_honoured_is_refused(api: Any) -> None:
    with pytest.raises(RuntimeError, match=r"422.*hr_upscaler"):  # hires fix runs, but only A1111's "Latent"
        api.txt2img(prompt="x", enable_hr=True, hr_upscaler="Latent (antialiased)", width=16, height=16)
    with pytest.raises(RuntimeError, match=r"422.*restore_faces"):
        api.txt2img(prompt="x", restore_faces=True, width=16, height=16)
    with pytest.raises(RuntimeError, match=r"422.*unknown sampler"):
        api.txt2img(prompt="x", sampler_name="Restart", width=16, height=16)
    with pytest.raises(RuntimeError, match=r"422.*multiple of 8"):
        api.txt2img(prompt="x", steps=1, width=20, height=16)


def test_txt2img_hires_fix_is_generate_with_hires(api: Any, serve_registry: Registry) -> None:
    result = api.txt2img(
        prompt="a red cube", seed=3, steps=2, width=32, height=24, sampler_name="DDIM", enable_hr=True,
        hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=3, denoising_strength=0.6,
    )  # fmt: skip
    expected = difftool.run(
        "generate", model="tiny-sd", prompt="a red cube", seed=3, steps=2, width=32, height=24, scheduler="ddim",
        hires=1.5, hires_upscaler="latent", hires_steps=3, hires_strength=0.6, registry=serve_registry,
    )  # fmt: skip
    assert result.image.size == (48, 32) and np.array_equal(pixels(result.image), pixels(expected.image))
    assert "Hires upscale: 1.5" in result.info["infotexts"][0]
    with pytest.raises(RuntimeError, match="hr_resize"):
        api.txt2img(prompt="x", steps=1, width=32, height=24, enable_hr=True, hr_resize_x=64, hr_resize_y=48)


def test_a1111_fields_difftool_lacks_are_refused_when_set_not_ignored(api: Any) -> None:
    for field, value in (("refiner_checkpoint", "sdxl-refiner"), ("s_churn", 0.5), ("firstphase_width", 256)):
        response = api.session.post(
            f"{api.baseurl}/txt2img", json={"prompt": "x", "width": 16, "height": 16, field: value}
        )
        assert response.status_code == 422 and field in response.json()["error"], (field, response.text)


def test_controlnet_units_from_webuiapi_match_difftool_run(api: Any, serve_registry: Registry, model_root: Any) -> None:
    """webuiapi's ControlNetUnit (sent as ``alwayson_scripts.ControlNet``) is difftool's ``--control``."""
    edges = Image.new("RGB", (64, 48))
    edges.paste((255, 255, 255), (16, 8, 40, 30))
    unit = webuiapi.ControlNetUnit(
        image=edges, module="canny", model="cn-tiny [0123abcd]", weight=0.8, resize_mode="Crop and Resize",
        threshold_a=80, threshold_b=200, guidance_end=0.6,
    )  # fmt: skip
    common = dict(prompt="a house", seed=4, steps=3, width=64, height=48)
    # A fresh alwayson_scripts: webuiapi adds the units to its mutable default dict, which every later
    # call (any client) would then send.
    result = api.txt2img(
        **common, sampler_name="Euler a", controlnet_units=[unit], alwayson_scripts={},
        override_settings={"sd_model_checkpoint": "tiny-sd8"},
    )  # fmt: skip
    path = model_root / "edges-for-a1111.png"
    edges.save(path)
    expected = difftool.run(
        "generate", model="tiny-sd8", scheduler="euler-a", registry=serve_registry, **common,
        control=[f"cn-tiny={path},pre=canny,weight=0.8,end=0.6,low=80,high=200"],
    )  # fmt: skip
    plain = difftool.run("generate", model="tiny-sd8", scheduler="euler-a", registry=serve_registry, **common)
    assert np.array_equal(pixels(result.image), pixels(expected.image))
    assert not np.array_equal(pixels(result.image), pixels(plain.image))  # the unit acted
    assert 'ControlNet 0: "Module: canny, Model: cn-tiny [' in result.info["infotexts"][0]


def test_controlnet_units_difftool_cannot_honour_are_refused_by_field(live_server: str) -> None:
    import urllib.error
    import urllib.request

    def post(unit: dict[str, Any]) -> tuple[int, str]:
        body = {"prompt": "x", "steps": 1, "width": 64, "height": 48,
                "override_settings": {"sd_model_checkpoint": "tiny-sd8"},
                "alwayson_scripts": {"ControlNet": {"args": [unit]}}}  # fmt: skip
        request = urllib.request.Request(
            f"http://{live_server}/sdapi/v1/txt2img", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    status, text = post({"model": "cn-tiny", "control_mode": "My prompt is more important"})
    assert status == 422 and "alwayson_scripts.ControlNet.args[0].control_mode" in text
    status, text = post({"model": "/etc/cn.safetensors"})
    assert status in (403, 422) and "not one of this server's models" in text
    status, text = post({"model": "cn-tiny", "module": "depth_midas"})  # txt2img: no image either
    assert status == 422 and ("preprocessor" in text or "control image" in text)


def test_default_checkpoint_is_never_a_refiner_or_an_inpainting_model(make_client: Any, model_root: Any) -> None:
    """Without ``default_model`` the first listed txt2img checkpoint: ``tiny-refiner`` sorts before
    ``tiny-sd`` but only finishes another model's image."""
    client = make_client(start_workers=False)
    names = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert names.index("tiny-refiner") < names.index("tiny-sd")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd"
