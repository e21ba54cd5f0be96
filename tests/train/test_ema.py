"""gcvit.train.ema: the EMA copies integer buffers and averages the rest as torch does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def test_ema_copies_integer_buffers_and_averages_the_rest_as_torch_does() -> None:
    """torch's EMA function averages integer buffers in float and truncates (decay 0.9999 turned relative-position
    index k into k - 1); ours copies them, and gives torch's values for every floating tensor."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from gcvit.train.ema import ema_update

    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **TINY)
    ours = AveragedModel(model, multi_avg_fn=ema_update(0.9999, False), use_buffers=True)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ours.update_parameters(model)
        torchs.update_parameters(model)
    a, b, now = ours.module.state_dict(), torchs.module.state_dict(), model.state_dict()
    integers = [k for k in a if not a[k].is_floating_point()]
    assert any("relative_position_index" in k for k in integers)
    assert all(torch.equal(a[k], now[k]) for k in integers)
    assert not all(torch.equal(b[k], now[k]) for k in integers)  # what torch's function does
    assert all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
