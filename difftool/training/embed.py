"""Install a trained model as the package's embedded default, with its model card.

    python -m difftool.training.embed inpaint runs/inpaint
    python -m difftool.training.embed superres runs/sr-x2 runs/sr-x4     # one SRNet run per scale

copies ``RUN/model`` to ``difftool/models/TASK`` (several runs: one variant folder each, ``x2/``,
``x4/``, picked by scale) and writes ``README.md`` there: data, held-out images, degradations,
sampling, the evaluation table and the training images' licences.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from difftool.plugins.builtin.pixel_model import EMBEDDED_ROOT, META_FILE
from difftool.training import degrade
from difftool.training.data import CORPUS, HOLDOUT, builtin_corpus


def _table(rows: list[dict], task: str) -> str:
    if task == "superres":
        out = [
            "| image | scale | PSNR model | PSNR bicubic | PSNR Lanczos | SSIM model | SSIM bicubic |",
            "|---|---|---|---|---|---|---|",
        ]
        for scale in (2, 4):
            chosen = [r for r in rows if r["scale"] == scale]
            for r in chosen:
                out.append(
                    f"| {r['image']} | {scale}x | {r['model_psnr']:.2f} | {r['bicubic_psnr']:.2f} | "
                    f"{r['lanczos_psnr']:.2f} | {r['model_ssim']:.4f} | {r['bicubic_ssim']:.4f} |"
                )
            gain = np.mean([r["model_psnr"] - r["bicubic_psnr"] for r in chosen])
            over_lanczos = np.mean([r["model_psnr"] - r["lanczos_psnr"] for r in chosen])
            out.append(
                f"| **mean gain** | {scale}x | {gain:+.2f} dB over bicubic | {over_lanczos:+.2f} dB over Lanczos "
                "| | | |"
            )
        return "\n".join(out)
    out = [
        "| image | masks | mask % | PSNR model | Telea | Navier-Stokes | PatchMatch | SSIM model | Telea |"
        " texture model | Telea | PatchMatch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ("model_psnr", "telea_psnr", "ns_psnr", "patchmatch_psnr", "model_ssim", "telea_ssim")
    keys += ("model_texture", "telea_texture", "patchmatch_texture")
    for r in [
        *rows,
        {"image": "**mean**", "masks": "", **{k: np.mean([r.get(k, np.nan) for r in rows]) for k in keys}},
    ]:
        fraction = f"{100 * r['mask_fraction']:.1f}" if "mask_fraction" in r else ""
        cells = " | ".join(f"{r.get(k, float('nan')):.{4 if k.endswith('ssim') else 2}f}" for k in keys)
        out.append(f"| {r['image']} | {r['masks']} | {fraction} | {cells} |")
    return "\n".join(out)


def model_card(
    task: str, meta: dict, config: dict, rows: list[dict], configs: list[dict] | None = None, run_name: str = ""
) -> str:
    """The model card; ``configs``: one training config per variant (SRNet: per scale), ``config`` the first."""
    train_names = [c.name for c in builtin_corpus("train")] if config.get("builtin_data", True) else []
    licences = sorted({CORPUS[n][2] for n in train_names})
    photos = _folder_photos(config)
    licences += [
        f"{stem}: {author}, {licence} (Debian package {package})" for stem, (package, author, licence) in photos
    ]
    sources = f"{len(train_names)} from PyPI wheels: {', '.join(train_names)}"
    if photos:
        sources += (
            f"; {len(photos)} colour photos from Debian's wallpaper packages "
            f"({', '.join(sorted({p for _, (p, _, _) in photos}))}; `python -m difftool.training.debian_photos "
            f"{config['folders'][0]}` prepares them): {', '.join(stem for stem, _ in photos)}"
        )
    formulation = (
        "residual: the sample is the high-resolution image minus the bicubic upsample of the input, "
        "which is concatenated as conditioning; the scale (2x or 4x) is a class label"
        if task == "superres"
        else "the sample is the clean image; the masked image (holes set to 0) and the mask are concatenated. "
        "At run time the default `--fill blur` starts from a push-pull fill of the hole refined by the model "
        "at `--strength 0.3`; `--fill noise` samples the hole from pure noise (the model alone)"
    )
    if config.get("arch") == "inpaintnet":
        texture_term = (
            f" plus {config['texture_weight']} x a texture term (local gradient energy against the photo's)"
            if config.get("texture_weight")
            else ""
        )
        formulation = (
            "the sample is the clean image; the masked image (holes set to 0) and the mask are concatenated. "
            "The network fills the hole with a push-pull pyramid first and predicts what that smooth fill "
            f"misses, trained with {config.get('loss', 'l1').upper()} loss{texture_term}: the mean of the "
            "plausible fills, what PSNR rewards. Its `difftool.json` sets the run-time defaults: `--fill noise`, "
            f"`--context {meta.get('context', 64)}` and `--texture {meta.get('texture', 0)}`, which pastes the "
            "fine detail of the best-matching nearby known tiles onto the smooth fill "
            "(`difftool/plugins/builtin/texture.py`; `--texture 0` keeps the smooth fill)"
        )
    degradations = (degrade.__doc__ or "").strip().split("\n\n", 1)[-1]
    real = config.get("degradation") == "real"
    if real:
        degradations = (
            " ".join((degrade.degrade_real.__doc__ or "").split())
            + " Mix: "
            + ", ".join(f"{kind} {share:.0%}" for kind, share in (config.get("real_mix") or degrade.REAL_MIX).items())
            + (f"; fine-tuned from `{config['init']}`." if config.get("init") else ".")
        )
    if config.get("arch") == "srnet":
        formulation = (
            "residual: the sample is the high-resolution image minus the bicubic upsample of the input, which "
            "is concatenated as conditioning; both are pixel-unshuffled to the low resolution, where the "
            "network works"
        )
        network = (
            f"A pixel-space diffusion model built like a super-resolution network (difftool's `SRNet`: "
            f"{config['blocks']} residual blocks of {config['channels']} channels without normalisation at the "
            "low resolution, FiLM timestep conditioning, a pixel-shuffle tail), one network per scale "
            f"(`x2/`, `x4/`), trained by difftool on {'a CUDA GPU' if config.get('device') == 'cuda' else 'CPU'}, "
            "shipped as fp16 safetensors."
        )
    elif config.get("arch") == "inpaintnet":
        network = (
            f"A pixel-space diffusion model built for holes (difftool's `InpaintNet`: a push-pull pyramid fill, "
            f"then {config['blocks']} dilated residual blocks of {config['channels']} channels at 1/4 resolution "
            "(dilations 1-8, reaching across a few hundred pixels), the mask at every level, a masked global "
            "average, FiLM timestep conditioning, a pixel-shuffle tail; the known pixels pass through "
            "unchanged), trained by difftool on CPU, shipped as fp16 safetensors."
        )
    else:
        network = (
            f"A pixel-space diffusion model (diffusers `UNet2DModel`, {len(config['block_out_channels'])} levels, "
            f"channels {config['block_out_channels']}, no attention) trained by difftool on CPU, shipped as fp16 "
            "safetensors."
        )
    config_name = f"{task}-{'real-' if real else ''}x{config['scales'][0]}" if config.get("arch") == "srnet" else task
    if run_name and (Path(__file__).parent / "configs" / f"{run_name}.json").is_file():
        config_name = run_name  # the run folder is named after its config, as the docs' commands do
    runs = "; ".join(
        (f"{c['scales'][0]}x: " if len(configs or []) > 1 else "")
        + f"{c['steps']} steps on {c['crop']} px crops, seed {c['seed']}"
        for c in (configs or [config])
    )
    title = f"{meta.get('name', task)}: the real-world {task} model" if real else f"difftool {task} model"
    clean_share = "" if real else f"`clean_fraction` {config.get('clean_fraction', 0.5)},"
    return f"""# {title} (embedded)

{network}

* **Formulation**: {formulation}. Predicts the clean sample (`prediction_type="sample"`), cosine noise
  schedule, sampled with DDIM "trailing" in **{meta["steps"]} step(s)** by default (`--steps` up to 8 works).
* **Training**: {runs}; batches of {config["batch"]} random crops
  (flips, rotations, 0.6-1.0 scale jitter), AdamW lr {config["lr"]} with warm-up and cosine decay,
  {config.get("loss", "l1").upper()} loss,
  EMA {config["ema_decay"]}, bf16 autocast. Config:
  `difftool/training/configs/{config_name}.json`{" (and the other scale's)" if config.get("arch") == "srnet" else ""};
  reproduce with
  `difftool train {task} --config difftool/training/configs/{config_name}.json -o runs/{config_name}`.
  Shipped weights: {meta.get("weights", "the EMA")}.
* **Training images** ({sources}).
* **Held out, never trained on**: {", ".join(HOLDOUT)}.
* **Degradations**: {degradations} This model: {clean_share}
  `few_step_fraction` {config.get("few_step_fraction", 0.5)}, `one_step_fraction` {config.get("one_step_fraction", 0)}.

## Evaluation on the held-out images

{_table(rows, task)}

Measured with `difftool.training.evaluate` (fp32, seed 0); `docs/benchmarks.md` has the bf16 numbers,
speed and memory.

## Licence of the training images

{chr(10).join(f"* {text}" for text in licences)}

The weights are released with difftool under its Apache-2.0 licence.
"""


def embed(
    task: str, runs: list[Path], weights: str = "ema", folder: str | None = None, name: str | None = None
) -> Path:
    """Copy the runs' models into the package (one run; or one per scale as variants) and write the card.

    ``weights``: ``ema`` (the exported EMA) or ``model`` (the final raw weights from the checkpoint).
    ``folder``: the package folder (default: the task's); ``name``: the model's name (``difftool-real``).
    """
    from difftool.training.evaluate import evaluate

    target = EMBEDDED_ROOT / (folder or task)
    tmp = EMBEDDED_ROOT / f".{folder or task}.new"
    if tmp.exists():  # never delete what this run did not make: a previous run's leftover is the user's call
        raise FileExistsError(f"{tmp} exists (a previous embed stopped part-way); remove it and rerun")
    configs = [json.loads((run / "checkpoint" / "state.json").read_text())["config"] for run in runs]
    if len(runs) == 1:
        _copy_model(runs[0], tmp, weights)
        meta = json.loads((tmp / META_FILE).read_text())
    else:
        tmp.mkdir(parents=True)
        variants = {}
        for run, config in zip(runs, configs, strict=True):
            (scale,) = config["scales"]
            variants[str(scale)] = f"x{scale}"
            _copy_model(run, tmp / f"x{scale}", weights)
        meta = json.loads((tmp / f"x{configs[0]['scales'][0]}" / META_FILE).read_text())
        meta.update(
            scales=sorted(int(k) for k in variants),
            variants=variants,
            default_variant=max(variants, key=int),
            trained_steps=" / ".join(
                f"{k}x: {json.loads((tmp / v / META_FILE).read_text())['trained_steps']}" for k, v in variants.items()
            ),
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    meta["weights"] = "the EMA of the weights" if weights == "ema" else "the final weights (not the EMA)"
    if name:
        meta["name"] = name
        for meta_file in tmp.glob(f"*/{META_FILE}"):  # each variant is a model of that name too
            variant = json.loads(meta_file.read_text())
            meta_file.write_text(json.dumps({**variant, "name": name}, indent=2, sort_keys=True))
        stored = json.loads((tmp / META_FILE).read_text())
        (tmp / META_FILE).write_text(json.dumps({**stored, "name": name}, indent=2, sort_keys=True))
    rows = evaluate(tmp, task, dtype="fp32")
    card = model_card(task, meta, configs[0], rows, configs, run_name=runs[0].name)
    if configs[0].get("degradation") == "real":
        card += "\n" + inputs_card(tmp)
    (tmp / "README.md").write_text(card)
    (tmp / "eval.json").write_text(json.dumps(rows, indent=1, default=float))
    from difftool.core.atomic import replace_dir

    return replace_dir(tmp, target)


def _folder_photos(config: dict) -> list[tuple[str, tuple[str, str, str]]]:
    """The Debian photos (:mod:`difftool.training.debian_photos`) among the config's ``folders``."""
    from difftool.training.data import folder_images
    from difftool.training.debian_photos import PHOTOS

    known = {Path(name).stem: source for name, source in PHOTOS.items()}
    missing = [folder for folder in config.get("folders", []) if not Path(folder).is_dir()]
    if missing:  # the card must list every training image and its licence: run from the repository root
        raise FileNotFoundError(
            f"training folder {missing[0]} (from the run's config) is not here; run from the "
            "folder the config's paths are relative to, or prepare it first"
        )
    found = [p.stem for folder in config.get("folders", []) for p in folder_images(Path(folder))]
    unknown = sorted(set(found) - set(known))
    if unknown:  # a card must name every training image and its licence
        raise ValueError(f"training folder images without a known source and licence: {', '.join(unknown)}")
    return [(stem, known[stem]) for stem in found]


def inputs_card(model: Path) -> str:
    """The real-world model's figures per kind of input (clean, JPEG, noise, blur), beside Lanczos."""
    from difftool.training.evaluate import evaluate_superres_inputs

    rows = evaluate_superres_inputs({"model": str(model)})
    lines = [
        "## Per kind of input, on the held-out images",
        "",
        "Each photo downscaled with Pillow's bicubic filter, then as named (JPEG: Pillow, 4:2:0). This model",
        "forced (`--model difftool-real`), fp32, seed 0; PSNR against the clean photo.",
        "",
        "| scale | input | PSNR Lanczos | PSNR model | gain | worst photo | SSIM Lanczos | SSIM model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scale in sorted({r["scale"] for r in rows}):
        for kind in dict.fromkeys(r["input"] for r in rows):
            chosen = [r for r in rows if r["scale"] == scale and r["input"] == kind]
            lanczos = sum(r["lanczos_psnr"] for r in chosen) / len(chosen)
            ours = sum(r["model_psnr"] for r in chosen) / len(chosen)
            worst = min(r["model_psnr"] - r["lanczos_psnr"] for r in chosen)
            ssim_l = sum(r["lanczos_ssim"] for r in chosen) / len(chosen)
            ssim_m = sum(r["model_ssim"] for r in chosen) / len(chosen)
            lines.append(
                f"| {scale}x | {kind} | {lanczos:.2f} | {ours:.2f} | {ours - lanczos:+.2f} dB | {worst:+.2f} dB | "
                f"{ssim_l:.4f} | {ssim_m:.4f} |"
            )
    return "\n".join(lines) + "\n"


def _copy_model(run: Path, folder: Path, weights: str) -> None:
    shutil.copytree(run / "model", folder)
    if weights == "model":  # the raw weights in place of the EMA, same network and config
        from safetensors.torch import load_file

        from difftool.plugins.builtin.pixel_model import WEIGHTS_FILE, network_class

        network = network_class(folder).from_pretrained(folder, use_safetensors=True, local_files_only=True)
        network.load_state_dict(load_file(run / "checkpoint" / "model.safetensors"))
        network.half().save_pretrained(folder, safe_serialization=True)
        assert (folder / WEIGHTS_FILE).is_file()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--folder", help="the package folder (default: the task's; superres-real)")
    parser.add_argument("--name", help="the model's name (default: the run's; difftool-real)")
    args = parser.parse_args()
    print(embed(args.task, args.runs, args.weights, args.folder, args.name))
