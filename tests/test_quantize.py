"""Int8 kept values (--scheme W8A16) on bare tensors: the rounding, and the block re-solve that absorbs it."""
import pytest
import torch

from converters.conversion.methods import get_method, make_options
from converters.conversion.methods.quantize import QMAX, quantize_layer, quantize_rows
from tests import independent
from tests.test_methods import make_layer, one_thread  # noqa: F401  (autouse fixture: one thread here too)


def test_rounding_is_symmetric_per_row_and_keeps_the_zeros():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 32, generator=g) * torch.rand(16, 1, generator=g) * (torch.rand(16, 32, generator=g) < 0.5)
    s[3] = 0.0
    q = quantize_rows(s)
    assert q.codes.dtype == torch.int8 and q.codes.shape == s.shape and q.scale.shape == (16,)
    assert not q.codes[s == 0].any()
    assert q.codes.abs().amax(1)[torch.arange(16) != 3].eq(QMAX).all() and q.codes.min() >= -QMAX
    assert torch.equal(q.scale, q.scale.to(torch.bfloat16).float()) and q.scale[3] == 1.0  # exact in bf16, fp16
    err = (q.scale[:, None] * q.codes.float() - s).abs()
    assert (err <= 0.5 * q.scale[:, None] * (1 + 1e-2)).all()  # round to nearest (bf16 scale: a hair over half a step)


@pytest.mark.parametrize("method", ["armor", "wanda"])
def test_quantized_layer_reports_its_own_loss(method):
    """The losses quantize_layer reports are those of W_eff = B_out · (scale · codes) · B_in, by plain torch; with
    blocks the re-solve lowers the loss from the one right after rounding, without blocks there is nothing to move."""
    w, stats = make_layer(n=64, k=64)
    opts = dict(block_size=16, iters=10) if method == "armor" else {}
    res = get_method(method)(w, stats, make_options(method, **opts), None)
    out, q, start, end = quantize_layer(w, stats.h, res)
    s = q.scale.double()[:, None] * q.codes.double()
    assert torch.equal(out.weight.double(), s)
    rounded = s if res.b_in is None else torch.block_diag(*res.b_out.double()) @ s @ torch.block_diag(*res.b_in.double())
    final = s if out.b_in is None else torch.block_diag(*out.b_out.double()) @ s @ torch.block_diag(*out.b_in.double())
    assert independent.proxy_loss(w, rounded, stats.h) == pytest.approx(start, rel=1e-4)
    assert independent.proxy_loss(w, final, stats.h) == pytest.approx(end, rel=1e-4)
    assert start > res.loss_end  # rounding costs something at this size
    if method == "armor":
        assert end < start - 0.1 * (start - res.loss_end), (res.loss_end, start, end)
    else:
        assert end == start and out.b_in is None
