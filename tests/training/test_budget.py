"""Memory estimates from shapes: live tensors in inference, kept activations in training."""

import torch
from torch import nn

from gigaseg.budget import inference_estimate, leaf_output_bytes, peak_live_bytes

MB = 2**20


class Chain(nn.Module):
    """Three 1 -> 8 -> 8 -> 1 channel convs on 256 x 256: each map 2 MB (8 ch) or 0.25 MB (1 ch)."""

    def __init__(self, skip: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 1, 1)
        self.skip = skip

    def forward(self, x):
        if not self.skip:
            return self.c(self.b(self.a(x)))  # a's output dies once b's exists
        a = self.a(x)
        return self.c(self.b(a) + a)


def test_a_chain_keeps_two_maps_alive_and_a_skip_keeps_three():
    x = torch.zeros(1, 1, 256, 256)
    # a's output alive while b's is made: 2 + 2 MB; then only b's (2) and c's (0.25)
    assert peak_live_bytes(Chain(skip=False), (x,)) == 4 * MB
    # a's, b's and their sum alive at once
    assert peak_live_bytes(Chain(skip=True), (x,)) == 6 * MB
    total, largest = leaf_output_bytes(Chain(skip=True), (x,), training=False)
    assert (total, largest) == (4 * MB + MB // 4, 2 * MB)  # leaf outputs only: the sum is not counted


def test_inference_estimate_scales_with_the_batch_and_counts_parameters():
    model = Chain(skip=True)
    one = inference_estimate(model, (torch.zeros(1, 1, 256, 256),), runtime=100, extra=10)
    four = inference_estimate(model, (torch.zeros(4, 1, 256, 256),))
    assert one.fixed == 110 + sum(p.numel() * 4 for p in model.parameters())
    assert abs(four.per_sample - 4 * one.per_sample) <= 4  # int() of a scaled figure
