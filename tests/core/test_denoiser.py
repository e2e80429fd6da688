import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from difftool.core.denoiser import TorchDenoiser
from difftool.testing import DenoiserConformance


class TestTorchDenoiserPixelModel(DenoiserConformance):
    """A concat-conditioned, class-conditioned pixel U-Net (difftool's superres layout)."""

    def make_denoiser(self):
        torch.manual_seed(0)
        unet = UNet2DModel(
            in_channels=6,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * 2,
            up_block_types=("UpBlock2D",) * 2,
            norm_num_groups=4,
            num_class_embeds=2,
            add_attention=False,
        )
        return TorchDenoiser(unet, prediction_type="sample")

    def make_conditioning(self, batch):
        return {
            "concat": torch.ones(batch, 3, self.size, self.size),
            "class_labels": torch.ones(batch, dtype=torch.long),
        }


class TestTorchDenoiserTextModel(DenoiserConformance):
    """A cross-attention U-Net (Stable Diffusion's layout)."""

    def make_denoiser(self):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            cross_attention_dim=12,
            attention_head_dim=2,
            norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        return TorchDenoiser(unet, prediction_type="epsilon")

    def make_conditioning(self, batch):
        context = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(1))
        return {"encoder_hidden_states": context.expand(batch, -1, -1)}

    def test_bf16_runs_and_returns_the_sample_dtype(self):
        d = TorchDenoiser(self.make_denoiser().module, prediction_type="epsilon", dtype=torch.bfloat16)
        out = d(torch.randn(1, 4, 16, 16), torch.tensor(10), self.make_conditioning(1))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
