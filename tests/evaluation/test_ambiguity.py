import numpy as np
import pytest
import torch

from idml.evaluation.ambiguity import blend_with_other_class, iterate_blends, uncertainty_by_blend_ratio


def test_blends_take_their_partner_from_another_class():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 2, 2)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    g = torch.Generator().manual_seed(0)
    out = blend_with_other_class(images, targets, 0.5, g)
    partner_value = 2 * out[:, 0, 0, 0] - images[:, 0, 0, 0]  # 0.5 x + 0.5 p
    partner_class = targets[partner_value.round().long()]
    assert (partner_class != targets).all()
    assert torch.equal(blend_with_other_class(images, targets, 0.0, g), images)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        blend_with_other_class(images, targets, 1.5, g)


def test_iterate_blends_uses_the_same_partners_at_every_ratio_and_stops_at_max_images():
    batches = [(torch.rand(4, 3, 2, 2), torch.tensor([0, 0, 1, 1])) for _ in range(3)]
    a = torch.cat(list(iterate_blends(batches, 0.2, seed=5, max_images=6)))
    b = torch.cat(list(iterate_blends(batches, 0.4, seed=5, max_images=6)))
    clean = torch.cat([x for x, _ in batches])[:6]
    assert len(a) == 6
    # x + r (p - x): the same partner p makes (a - clean) / 0.2 == (b - clean) / 0.4
    assert torch.allclose((a - clean) / 0.2, (b - clean) / 0.4, atol=1e-5)


def test_blend_ratio_summary():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=50)
    rising = {r: base + 3 * r for r in (0.0, 0.25, 0.5)}
    out = uncertainty_by_blend_ratio(rising)
    assert out["spearman"] > 0.5 and out["share_rising"] == 1.0
    assert out["mean"] == pytest.approx([base.mean(), base.mean() + 0.75, base.mean() + 1.5])
    flat = uncertainty_by_blend_ratio({r: base for r in (0.0, 0.5)})
    assert abs(flat["spearman"]) < 1e-9 and flat["share_rising"] == 0.0
    with pytest.raises(ValueError, match="same non-empty set"):
        uncertainty_by_blend_ratio({0.0: base, 0.5: base[:10]})
