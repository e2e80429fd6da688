"""Install a trained model as the package's embedded default, with its model card.

    python -m difftool.training.embed superres runs/superres

copies ``runs/superres/model`` to ``difftool/models/superres`` and writes ``README.md`` there: data,
held-out images, degradations, sampling, the evaluation table and the training images' licences.
"""

from __future__ import annotations

import json
import shutil
import sys
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
            out.append(f"| **mean gain** | {scale}x | {gain:+.2f} dB over bicubic | | | | |")
        return "\n".join(out)
    out = [
        "| image | mask % | PSNR default (`--fill blur`) | PSNR `--fill noise` | PSNR Telea | PSNR Navier-Stokes |"
        " SSIM default | SSIM Telea |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['image']} | {100 * r['mask_fraction']:.1f} | {r['model_psnr']:.2f} | "
            f"{r['model_noise_psnr']:.2f} | {r.get('telea_psnr', float('nan')):.2f} | "
            f"{r.get('ns_psnr', float('nan')):.2f} | {r['model_ssim']:.4f} | {r.get('telea_ssim', float('nan')):.4f} |"
        )
    keys = ("model_psnr", "model_noise_psnr", "telea_psnr", "ns_psnr")
    means = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    out.append(
        f"| **mean** | | {means['model_psnr']:.2f} | {means['model_noise_psnr']:.2f} | "
        f"{means['telea_psnr']:.2f} | {means['ns_psnr']:.2f} | | |"
    )
    return "\n".join(out)


def model_card(task: str, meta: dict, config: dict, rows: list[dict]) -> str:
    train_names = [c.name for c in builtin_corpus("train")]
    licences = sorted({CORPUS[n][2] for n in train_names})
    formulation = (
        "residual: the sample is the high-resolution image minus the bicubic upsample of the input, "
        "which is concatenated as conditioning; the scale (2x or 4x) is a class label"
        if task == "superres"
        else "the sample is the clean image; the masked image (holes set to 0) and the mask are concatenated. "
        "At run time the default `--fill blur` starts from a push-pull fill of the hole refined by the model "
        "at `--strength 0.3`; `--fill noise` samples the hole from pure noise (the model alone)"
    )
    degradations = (degrade.__doc__ or "").strip().split("\n\n", 1)[-1]
    return f"""# difftool {task} model (embedded)

A pixel-space diffusion model (diffusers `UNet2DModel`, {sum(1 for _ in config["block_out_channels"])} levels,
channels {config["block_out_channels"]}, no attention) trained by difftool on CPU, shipped as fp16 safetensors.

* **Formulation**: {formulation}. Predicts the clean sample (`prediction_type="sample"`), cosine noise
  schedule, sampled with DDIM "trailing" in **{meta["steps"]} steps** by default (`--steps` up to 8 works).
* **Training**: {meta.get("trained_steps")} steps of batch {config["batch"]} random {config["crop"]} px crops
  (flips, rotations, 0.6-1.0 scale jitter), AdamW lr {config["lr"]} with warm-up and cosine decay, L1 loss,
  EMA {config["ema_decay"]}, bf16 autocast, seed {config["seed"]}. Config:
  `difftool/training/configs/{task}.json`; reproduce with
  `difftool train {task} --config difftool/training/configs/{task}.json -o runs/{task}`.
* **Training images** ({len(train_names)}, from PyPI wheels): {", ".join(train_names)}.
* **Held out, never trained on**: {", ".join(HOLDOUT)}.
* **Degradations**: {degradations} This model: `clean_fraction` {config.get("clean_fraction", 0.5)},
  `few_step_fraction` {config.get("few_step_fraction", 0.5)}.

## Evaluation on the held-out images

{_table(rows, task)}

Measured with `difftool.training.evaluate` (fp32, seed 0); `docs/benchmarks.md` has the bf16 numbers,
speed and memory.

## Licence of the training images

{chr(10).join(f"* {text}" for text in licences)}

The weights are released with difftool under its Apache-2.0 licence.
"""


def embed(task: str, run: Path) -> Path:
    from difftool.training.evaluate import evaluate

    source = run / "model"
    meta = json.loads((source / META_FILE).read_text())
    config = json.loads((run / "checkpoint" / "state.json").read_text())["config"]
    target = EMBEDDED_ROOT / task
    tmp = EMBEDDED_ROOT / f".{task}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    rows = evaluate(tmp, task, dtype="fp32")
    (tmp / "README.md").write_text(model_card(task, meta, config, rows))
    (tmp / "eval.json").write_text(json.dumps(rows, indent=1, default=float))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    print(embed(sys.argv[1], Path(sys.argv[2])))
