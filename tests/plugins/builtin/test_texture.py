import numpy as np
import torch

from difftool.plugins.builtin.inpaintnet import pyramid_fill
from difftool.plugins.builtin.texture import transfer_texture
from difftool.training.evaluate import texture_ratio


def grainy(height: int = 96, width: int = 120) -> torch.Tensor:
    """A smooth colour ramp with grain on it: what a smooth fill misses is the grain."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.5, 0.5, width).expand(1, 3, height, width).clone()
    ramp[:, 1] *= -1
    return ramp + 0.15 * torch.randn(1, 3, height, width, generator=g)


def test_transfer_adds_grain_only_in_the_hole_and_as_much_as_around_it() -> None:
    image = grainy()
    known = torch.ones(1, 1, 96, 120)
    known[..., 30:70, 40:90] = 0
    smooth = pyramid_fill(image * known, known)
    textured = transfer_texture(smooth, known)
    assert torch.equal(textured * known, smooth * known)  # known pixels untouched
    mask = known[0, 0].numpy() == 0
    as_uint8 = [((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255) for x in (image, smooth, textured)]
    truth, before, after = as_uint8
    assert texture_ratio(truth, before, mask) < 0.2
    assert 0.6 < texture_ratio(truth, after, mask) < 1.4
    # The colours stay the smooth fill's: grain is added, not a different picture.
    assert abs(float((textured - smooth)[..., 30:70, 40:90].mean())) < 0.02
    assert torch.equal(transfer_texture(smooth, known), textured)  # deterministic


def test_no_amount_or_no_hole_or_no_source_changes_nothing() -> None:
    image = grainy(32, 40)
    known = torch.ones(1, 1, 32, 40)
    assert torch.equal(transfer_texture(image, known), image)
    known[..., 10:20, 10:20] = 0
    assert torch.equal(transfer_texture(image, known, amount=0.0), image)
    nothing_known = torch.zeros_like(known)
    assert torch.equal(transfer_texture(image, nothing_known), image)


def test_odd_sizes_and_amount_scale_the_grain() -> None:
    image = grainy(67, 93)
    known = torch.ones(1, 1, 67, 93)
    known[..., 25:45, 35:60] = 0
    smooth = pyramid_fill(image * known, known)
    half, full = (transfer_texture(smooth, known, amount=a) - smooth for a in (0.5, 1.0))
    assert half.shape == image.shape
    torch.testing.assert_close(half * 2, full)
    assert float(full.abs().sum()) > 0 and np.isfinite(full.numpy()).all()
