"""skipped_weight_init: no random draws inside, everything restored after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dissect_tui.weights_init import skipped_weight_init


def test_no_weights_are_drawn_inside_and_fills_come_back():
    originals = (nn.init.kaiming_uniform_, nn.init.normal_, nn.init.trunc_normal_)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with skipped_weight_init():
        nn.Linear(64, 64)
        nn.Conv2d(3, 8, 3)
        nn.init.normal_(torch.empty(10))
    assert torch.equal(torch.get_rng_state(), before)  # nothing consumed the generator
    nn.Linear(64, 64)
    assert not torch.equal(torch.get_rng_state(), before)
    assert (nn.init.kaiming_uniform_, nn.init.normal_, nn.init.trunc_normal_) == originals


def test_fills_come_back_after_an_error():
    original = nn.init.kaiming_uniform_
    with pytest.raises(RuntimeError), skipped_weight_init():
        assert nn.init.kaiming_uniform_ is not original
        raise RuntimeError("build failed")
    assert nn.init.kaiming_uniform_ is original
