import pytest
import torch
import torch.nn.functional as F

from adbench.models._resize import resize, resize_matrix
from conftest import script_module


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape,size", [((2, 5, 8, 8), (16, 16)), ((1, 3, 7, 9), (13, 4)), ((2, 2, 1, 5), (3, 10)),
                                        ((4, 16, 32, 32), (64, 64)), ((3, 8, 8), (256, 256))])
def test_resize_equals_torch_align_corners(mode, shape, size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    flat = x.reshape(-1, 1, *shape[-2:])
    expected = F.interpolate(flat, size=size, mode=mode, align_corners=True).reshape(*shape[:-2], *size)
    assert resize(x, size, mode).shape == expected.shape
    assert (resize(x, size, mode) - expected).abs().max() <= 1e-5 * x.abs().max()  # float32 rounding


def test_resize_rows_are_interpolation_weights_and_unknown_modes_fail():
    for mode in ("bilinear", "bicubic"):
        m = resize_matrix(7, 19, mode)
        assert torch.allclose(m.sum(1), torch.ones(19)) and torch.equal(m[0], torch.eye(7)[0])  # corners kept
    with pytest.raises(ValueError, match="resize mode must be bilinear or bicubic, got 'nearest'"):
        resize_matrix(4, 8, "nearest")


def test_roofline_counts_the_matrix_resizes_as_torch_kernels_and_puts_them_back():
    from adbench.features import create_extractor
    from adbench.models import _resize, create_model, resolve_config

    roofline = script_module("roofline")
    cfg = resolve_config("cflow", "resnet18")
    ext = create_extractor("resnet18", cfg.layers, weights="random")
    det = create_model("cflow", ext, 64, cfg).eval()
    cflow = __import__(type(det).__module__, fromlist=["resize"])
    images = torch.randn(2, 3, 64, 64)
    dense = roofline.flops_of(lambda: det.predict(images))
    with roofline.reference_kernels():
        assert cflow.resize is roofline.torch_resize
        counted = roofline.flops_of(lambda: det.predict(images))
        maps = torch.randn(2, 3, 4, 4)  # CLS+CNF's decoder resizes through _resize.resize as well
        assert roofline.flops_of(lambda: _resize.resize_bicubic(maps, (8, 8))) == 0
    assert roofline.flops_of(lambda: _resize.resize_bicubic(maps, (8, 8))) > 0
    assert cflow.resize is _resize.resize and _resize.resize.__module__ == _resize.__name__  # put back, both places
    products = sum(2 * 2 * (64 * h * w + 64 * w * 64) for _, h, w in ext.feature_shapes(64))  # rows @ m @ cols.T
    assert dense - counted == products > 0


def test_roofline_counts_the_ssim_window_as_two_1d_convolutions_and_puts_it_back():
    from adbench.models import _ssim

    roofline = script_module("roofline")
    a, b = torch.rand(2, 3, 64, 32), torch.rand(2, 3, 64, 32)
    banded, reference = roofline.flops_of(lambda: _ssim.ssim_map(a, b)), _ssim.ssim_map(a, b)
    with roofline.reference_kernels():
        assert _ssim._window is roofline.separable_window
        counted = roofline.flops_of(lambda: _ssim.ssim_map(a, b))
        torch.testing.assert_close(_ssim.ssim_map(a, b), reference, rtol=1e-5, atol=1e-5)  # the same window
    assert _ssim._window.__module__ == _ssim.__name__  # put back
    # 2 images x 15 planes, 11 taps, 2 FLOPs each: the rows pass over the padded width, then the columns pass
    assert counted == 2 * 15 * 2 * 11 * (64 * (32 + 10) + 64 * 32) < banded
