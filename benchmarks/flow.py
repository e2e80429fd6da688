"""SD 3.5 and Flux.1 on this machine: difftool against diffusers, random weights built here, one run.

    python benchmarks/flow.py --quick       # the same paths on 2-layer transformers, a few minutes
    python benchmarks/flow.py               # full size: about an hour on 2 free CPU cores, 24 GB RAM
    python benchmarks/flow.py --part flux   # one part (sd3 | flux); the other's figures are kept
    python benchmarks/flow.py --part flux --flux-layers 1,2   # full T5-XXL, a 3-block transformer

``--sd3-layers``, ``--flux-layers DOUBLE,SINGLE`` and ``--t5-layers`` build shallower models of the same
widths (``--quick``: 2; 1,2; 2). With a shallower Flux transformer the report adds the peak the full one
would reach: the measured peak plus the fp8 bytes of the blocks left out (the weights are all in memory
at once; a block's activations are freed before the next runs).

Measures, and writes to docs/benchmarks-flow.json and docs/benchmarks.md:

* **SD 3.5 medium** (2.5 B transformer parameters: the public ``stabilityai/stable-diffusion-3.5-medium``
  transformer config) at 512x512 with CFG (batch 2): seconds per step for diffusers'
  ``StableDiffusion3Pipeline`` and difftool ``generate``, fp32 and bf16, from each one's step callback (the
  first step is warm-up and not counted). The text encoders keep their real widths but one layer and no T5
  (both pipelines then pad with zeros: the same 333 text tokens); they run once, outside the timed steps.
* **Flux.1 dev** (11.9 B transformer parameters, stored fp8 e4m3fn as ComfyUI users keep it:
  ``models/diffusion_models/flux1-dev-fp8.safetensors``, ``models/text_encoders/{clip_l,
  t5xxl_fp8_e4m3fn}.safetensors`` with the full 4.7 B T5-XXL, ``models/vae/ae.safetensors``): peak RSS
  (VmHWM) and wall time of a whole ``difftool run generate`` at 512x512 in bf16 in a fresh process with
  the low-memory mode (``--backend-opt offload=model``).

The files are written tensor by tensor (``write_random``), so no fp32 copy of a model is ever in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "builtin" / "flow"))  # tiny.py: key layouts

from measure import cpu_name  # noqa: E402
from sections import update_section  # noqa: E402

JSON = ROOT / "docs" / "benchmarks-flow.json"
SIZE = 512
#: stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in 13 layers).
SD35_MEDIUM = {"attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
               "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
               "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
               "dual_attention_layers": list(range(13))}  # fmt: skip
#: black-forest-labs/FLUX.1-dev, transformer/config.json.
FLUX_DEV = {"attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
            "in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56], "patch_size": 1}  # fmt: skip
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # fmt: skip


def shapes_of(cls: type, config: dict) -> dict[str, tuple[int, ...]]:
    """A module's parameter shapes, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = cls(**config) if not hasattr(cls, "from_config") else cls.from_config(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], matrices: torch.dtype, vectors: torch.dtype) -> int:
    """A safetensors file of random weights, written tensor by tensor: matrices N(0, 0.02) in ``matrices``
    (e.g. fp8), vectors in ``vectors`` (norm scales 1, biases 0). Returns the parameter count."""
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02
    pools = {dtype: pool.to(dtype).view(torch.uint8).numpy() for dtype in {matrices, vectors}}
    header, offset, plan = {}, 0, []
    for name, shape in shapes.items():
        dtype = matrices if len(shape) >= 2 else vectors
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        plan.append((name, shape, dtype, size))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for i, (name, shape, dtype, size) in enumerate(plan):
            if len(shape) < 2:  # norm weights and scales 1, biases 0: activations stay finite through 57 blocks
                one = name.endswith(("weight", "scale"))
                f.write((torch.ones if one else torch.zeros)(shape, dtype=dtype).view(torch.uint8).numpy().tobytes())
                continue
            source, start = pools[dtype], (i * 7919 * dtype.itemsize) % (len(pools[dtype]) // 2)
            while size:  # cycle through the pool from a per-tensor offset
                chunk = source[start : start + size]
                f.write(chunk.tobytes())
                size -= len(chunk)
                start = 0
    return sum(math.prod(s) for s in shapes.values())


def save_small(module: torch.nn.Module, path: Path, keys: object = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    state = keys(state) if keys else state  # type: ignore[operator]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))


def clip(role: str, layers: int | None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difftool.plugins.builtin.flow.families import base_configs

    config = dict(base_configs()[role])
    if layers:
        config["num_hidden_layers"] = layers
    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if layers else CLIPTextModel  # SD3: projection; Flux's CLIP-L: none
    return cls(CLIPTextConfig(**config)).eval()


def vae(family: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    from difftool.plugins.builtin.flow.families import base_configs

    scaling, shift = base_configs()["vae_factors"][family]
    torch.manual_seed(0)
    return AutoencoderKL(**base_configs()["vae"], scaling_factor=scaling, shift_factor=shift).eval()


# --- SD 3.5 medium: seconds per step -----------------------------------------------------------------
def build_sd3(folder: Path, layers: int) -> int:
    from diffusers import SD3Transformer2DModel

    config = dict(SD35_MEDIUM, num_layers=layers, dual_attention_layers=list(range(min(13, layers - 1))))
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **config}))
    shapes = shapes_of(SD3Transformer2DModel, config)
    params = write_random(folder / "transformer" / "diffusion_pytorch_model.safetensors", shapes, torch.bfloat16,
                          torch.bfloat16)  # fmt: skip
    clip("clip_l", 1).save_pretrained(folder / "text_encoder")
    clip("clip_g", 1).save_pretrained(folder / "text_encoder_2")
    vae("sd3").save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return params


def diffusers_sd3_seconds(folder: Path, dtype: torch.dtype, steps: int) -> float:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from difftool.plugins.builtin.flow.tokenizers import clip_tokenizer

    local = {"local_files_only": True, "torch_dtype": dtype}
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer", **local),
        vae=AutoencoderKL.from_pretrained(folder / "vae", **local),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **local),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **local),
        tokenizer=clip_tokenizer("clip_l"), tokenizer_2=clip_tokenizer("clip_g"), text_encoder_3=None,
        tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )  # fmt: skip
    stamps: list[float] = []

    def on_step(pipe, i, t, kwargs):  # noqa: ANN001 - diffusers' callback signature
        stamps.append(time.perf_counter())
        return kwargs

    pipe("a photo", width=SIZE, height=SIZE, num_inference_steps=steps, guidance_scale=5.0,
         callback_on_step_end=on_step, output_type="latent")  # fmt: skip
    del pipe
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def difftool_sd3_seconds(folder: Path, dtype: str, steps: int) -> float:
    from difftool.app import api
    from difftool.core.runtime import current

    stamps: list[float] = []
    api.run("generate", model=str(folder), prompt="a photo", width=SIZE, height=SIZE, steps=steps,
            guidance_scale=5.0, dtype=dtype, seed=0,
            progress=lambda step, total, preview: stamps.append(time.perf_counter()))  # fmt: skip
    current().cache("flow-models", dict).clear()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_sd3(tmp: Path, layers: int, steps: int) -> dict:
    import gc

    folder = tmp / "sd3.5-medium-random"
    r: dict = {"sd3_params_m": round(build_sd3(folder, layers) / 1e6, 1), "sd3_layers": layers, "sd3_steps": steps}
    for name, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        r[f"sd3_diffusers_{name}_s_per_step"] = round(diffusers_sd3_seconds(folder, torch_dtype, steps), 2)
        gc.collect()
        r[f"sd3_difftool_{name}_s_per_step"] = round(difftool_sd3_seconds(folder, name, steps), 2)
        gc.collect()
        r[f"sd3_{name}_ratio"] = round(r[f"sd3_difftool_{name}_s_per_step"] / r[f"sd3_diffusers_{name}_s_per_step"], 2)
        print(r, flush=True)
    return r


# --- Flux.1 dev, fp8: peak RSS of a whole low-memory run ---------------------------------------------
def build_flux(root: Path, layers: tuple[int, int], t5_layers: int) -> tuple[Path, int, dict]:
    import tiny
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from difftool.plugins.builtin.flow.families import base_configs

    models = root / "models"
    config = dict(FLUX_DEV, num_layers=layers[0], num_single_layers=layers[1])
    with torch.device("meta"):  # BFL's key names from diffusers' (the layout flux1-dev.safetensors has)
        meta = tiny.bfl_flux_keys(FluxTransformer2DModel(**config).state_dict())
    model = models / "diffusion_models" / "flux1-dev-fp8.safetensors"
    params = write_random(model, {k: tuple(v.shape) for k, v in meta.items()}, torch.float8_e4m3fn, torch.bfloat16)
    t5 = dict(base_configs()["t5xxl"], num_layers=t5_layers)
    t5_shapes = shapes_of(T5EncoderModel, {"config": T5Config(**t5)})
    write_random(models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", t5_shapes, torch.float8_e4m3fn,
                 torch.bfloat16)  # fmt: skip
    save_small(clip("clip_l", None), models / "text_encoders" / "clip_l.safetensors")
    levels = len(base_configs()["vae"]["block_out_channels"])
    save_small(vae("flux"), models / "vae" / "ae.safetensors", lambda s: tiny.ldm_vae_keys(s, levels))
    return model, params, config


#: The child process: runs ``difftool ARGS``, then prints its time, outcome, VmHWM and the peaks (sampled every
#: 0.1 s) of its anonymous memory and of its file-backed pages: safetensors maps weight files, and those
#: clean pages count in RSS though the kernel can drop them and read them again.
CHILD = """
import sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
from difftool.cli import main
t, ok = time.perf_counter(), "ok"
try:
    main(sys.argv[1:])
except SystemExit as e:
    ok = "ok" if not e.code else f"exit_{e.code}"
print("SECONDS", time.perf_counter() - t)
print("OUTCOME", ok)
print("RSS", [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
print("ANON", peaks["RssAnon"])
print("FILE", peaks["RssFile"])
"""


def flux_bytes(config: dict) -> tuple[int, int]:
    """(bytes of the fp8 file, bytes its loading casts to bf16) for a Flux transformer of ``config``: the layers
    diffusers' layerwise casting skips (norms' modulation linears, embedders, the output projection) are cast
    to the compute precision when loaded, as ``difftool.plugins.builtin.flow.fp8.keep_in_fp8`` picks them."""
    import re

    from diffusers import FluxTransformer2DModel
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    with torch.device("meta"):
        module = FluxTransformer2DModel(**config)
    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *(module._keep_in_fp32_modules or ()),
                *(module._skip_layerwise_casting_patterns or ()))  # fmt: skip
    file = anon = 0
    for name, sub in module.named_modules():
        hooked = isinstance(sub, _GO_LC_SUPPORTED_PYTORCH_LAYERS) and not any(re.search(p, name) for p in patterns)
        for p in sub.parameters(recurse=False):
            file += p.numel() * (1 if p.ndim >= 2 else 2)
            anon += 0 if hooked else p.numel() * 2
    return file, anon


def timed_run(args: list[str]) -> dict[str, float | str]:
    """Seconds, outcome and peak memory (GiB: ``rss``, ``anon``, ``file``) of one ``difftool ...`` command in a
    fresh process; as measure.timed_run, but read even when the run fails (the outcome says so)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    keys = ("SECONDS", "OUTCOME", "RSS", "ANON", "FILE")
    values = dict(line.split() for line in out.stdout.splitlines() if line.startswith(keys))
    if "RSS" not in values:
        raise RuntimeError(out.stderr[-2000:])
    if values["OUTCOME"] != "ok":
        print(out.stderr[-2000:], file=sys.stderr)
    gib = {k.lower(): round(int(values[k]) / 2**20, 2) for k in ("RSS", "ANON", "FILE")}
    return {"seconds": round(float(values["SECONDS"]), 1), "outcome": values["OUTCOME"], **gib}


def run_flux(tmp: Path, layers: tuple[int, int], t5_layers: int, steps: int) -> dict:
    model, params, config = build_flux(tmp, layers, t5_layers)
    r: dict = {"flux_params_m": round(params / 1e6, 1), "flux_layers": list(layers), "flux_t5_layers": t5_layers,
               "flux_steps": steps, "flux_file_gib": round(model.stat().st_size / 2**30, 2)}  # fmt: skip
    args = ["run", "generate", "--model", str(model), "--prompt", "a photo", "--steps", str(steps),
            "--width", str(SIZE), "--height", str(SIZE), "--dtype", "bf16", "--seed", "0",
            "--backend-opt", "offload=model", "-o", str(tmp / "flux.png")]  # fmt: skip
    run = timed_run(args)
    r |= {"flux_lowmem_rss_gib": run["rss"], "flux_lowmem_anon_gib": run["anon"], "flux_lowmem_file_gib": run["file"],
          "flux_lowmem_seconds": run["seconds"], "flux_outcome": run["outcome"]}  # fmt: skip
    if config != FLUX_DEV:  # what the blocks left out would add: their file pages and their bf16 layers
        (file_full, anon_full), (file_built, anon_built) = flux_bytes(FLUX_DEV), flux_bytes(config)
        r["flux_full_file_gap_gib"] = round((file_full - file_built) / 2**30, 2)
        r["flux_full_anon_gap_gib"] = round((anon_full - anon_built) / 2**30, 2)
        r["flux_full_rss_estimate_gib"] = round(
            float(run["rss"]) + r["flux_full_file_gap_gib"] + r["flux_full_anon_gap_gib"], 2
        )
        r["flux_full_anon_estimate_gib"] = round(float(run["anon"]) + r["flux_full_anon_gap_gib"], 2)
    print(r, flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2-layer transformers and T5 (checks the paths)")
    parser.add_argument("--sd3-layers", type=int, default=None, help="SD 3.5 medium: 24")
    parser.add_argument("--flux-layers", default=None, help="DOUBLE,SINGLE blocks (Flux.1: 19,38)")
    parser.add_argument("--t5-layers", type=int, default=None, help="T5-XXL: 24")
    parser.add_argument("--part", choices=("all", "sd3", "flux"), default="all")
    parser.add_argument("--steps", type=int, default=3, help="SD 3.5 steps per run (the first is not timed)")
    parser.add_argument("--flux-steps", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    sd3_layers = args.sd3_layers or (2 if args.quick else SD35_MEDIUM["num_layers"])
    flux_layers = tuple(int(n) for n in (args.flux_layers or ("1,2" if args.quick else "19,38")).split(","))
    t5_layers = args.t5_layers or (2 if args.quick else 24)
    previous = json.loads(JSON.read_text()) if JSON.is_file() and not args.quick else {}
    rerun = ("sd3_", "flux_") if args.part == "all" else (f"{args.part}_",)
    previous = {k: v for k, v in previous.items() if not k.startswith(rerun)}  # no stale figure of a part rerun
    results = {**previous, "cpu": cpu_name(), "threads": torch.get_num_threads(), "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "sd3"):
            results |= run_sd3(Path(tmp), sd3_layers, args.steps)
        if args.part in ("all", "flux"):
            results |= run_flux(Path(tmp), flux_layers, t5_layers, args.flux_steps)
    print(json.dumps(results, indent=2))
    JSON.with_name("benchmarks-flow-quick.json" if args.quick else JSON.name).write_text(
        json.dumps(results, indent=2) + "\n"
    )
    if not args.quick:
        write_markdown(Path(args.out), results)


def write_markdown(path: Path, r: dict) -> None:
    def get(key: str) -> object:
        return r.get(key, "not run")

    reference_bf16 = get("sd3_diffusers_bf16_s_per_step")
    sd3 = f"""SD 3.5 medium-size transformer ({get("sd3_params_m")} M parameters, {get("sd3_layers")} of 24 layers), CFG
(batch 2), flow-matching Euler: seconds per step from each pipeline's step callback ({get("sd3_steps")} steps, the
first not counted).

| | fp32 s/step | bf16 s/step |
|---|---|---|
| diffusers `StableDiffusion3Pipeline` | {get("sd3_diffusers_fp32_s_per_step")} | {reference_bf16} |
| difftool `generate` | {get("sd3_difftool_fp32_s_per_step")} | {get("sd3_difftool_bf16_s_per_step")} |
| difftool / diffusers | {get("sd3_fp32_ratio")} | {get("sd3_bf16_ratio")} |
"""
    layers = r.get("flux_layers", [19, 38])
    full = list(layers) == [19, 38]
    blocks = (
        "the full 19 double + 38 single blocks"
        if full
        else f"{layers[0]} double + {layers[1]} single of 19 + 38 blocks"
    )
    estimate = ""
    if not full:
        estimate = (
            f" The {57 - sum(layers)} blocks left out would add {get('flux_full_file_gap_gib')} GiB of fp8 file pages"
            f" and {get('flux_full_anon_gap_gib')} GiB of layers cast to bf16 at load (the modulation linears"
            f" layerwise casting skips): for the full model an estimated peak RSS of"
            f" **{get('flux_full_rss_estimate_gib')} GiB**, of which"
            f" {get('flux_full_anon_estimate_gib')} GiB anonymous."
        )
        total = Path("/proc/meminfo").read_text().split()[1]  # MemTotal, kB
        if float(r["flux_full_rss_estimate_gib"]) > int(total) / 2**20:
            estimate += (
                f" That is more than this machine's {int(total) / 2**20:.0f} GiB: what does not fit is file pages the"
                " kernel would drop and read again from disk while sampling, so the full model was not run here."
            )
    flux = f"""Flux.1 dev-size transformer (fp8 e4m3fn, {blocks}: {get("flux_params_m")} M parameters,
{get("flux_file_gib")} GiB transformer file), T5-XXL ({get("flux_t5_layers")} of 24 layers, fp8), CLIP-L and the VAE in
ComfyUI's folders: `difftool run generate --dtype bf16 --backend-opt offload=model` at 512x512,
{get("flux_steps")} step, fresh process (load, encode, sample, decode; outcome: {get("flux_outcome")}, {
        get("flux_lowmem_seconds")
    } s): peak RSS **{get("flux_lowmem_rss_gib")} GiB**; peak anonymous memory
{get("flux_lowmem_anon_gib")} GiB, peak file-backed pages {
        get("flux_lowmem_file_gib")
    } GiB (the weight files safetensors
maps: counted in RSS, but clean pages the kernel can drop and read again).{estimate}
"""
    body = f"""## SD 3.5 medium and Flux.1 dev (random weights), 512x512

`python benchmarks/flow.py` on {r["cpu"]} ({r["threads"]} threads), 24 GB RAM, shared with other work
while it ran: timings are upper bounds, and the ratios compare runs made one after the other under
changing load, so they are only as steady as that load (rerun on an idle machine for firm figures).

{sd3 if "sd3_layers" in r else ""}
{flux if "flux_layers" in r else ""}"""
    update_section(path, "flow-benchmark", body)


if __name__ == "__main__":
    main()
