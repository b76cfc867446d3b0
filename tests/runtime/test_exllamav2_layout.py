"""The embedding block the exllamav2 backend hands over per image, laid out as mistral-common's tokens
(runs on the CPU: the layout is plain torch; exllamav2 itself is not imported)."""

from __future__ import annotations

import torch

from pixtral.image import ImageTokenIds, image_token_ids
from runtime.backends.exllamav2 import layout_block


def test_features_at_img_positions_markers_at_theirs() -> None:
    rows, cols, hidden = 3, 4, 8
    features = torch.arange(rows * cols * hidden, dtype=torch.float32).reshape(rows * cols, hidden)
    img_break, img_end = torch.full((hidden,), -1.0), torch.full((hidden,), -2.0)
    block = layout_block(features, (rows, cols), img_break, img_end)
    ids = image_token_ids(rows, cols, ImageTokenIds(10, 12, 13))  # mistral-common's layout
    assert block.shape == (len(ids), hidden) == (rows * (cols + 1), hidden)
    is_img = torch.tensor(ids) == 10
    assert torch.equal(block[is_img], features)  # row-major patches, in order
    assert torch.equal(block[torch.tensor(ids) == 12], img_break.expand(rows - 1, hidden))
    assert torch.equal(block[-1], img_end) and ids[-1] == 13  # no trailing [IMG_BREAK] before [IMG_END]
