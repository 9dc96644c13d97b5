"""The search space: per-stage ratios plus one for the residual streams, or per-layer ratios."""

from dataclasses import replace

import torch

from ccpcsa.models import build_model, get_spec
from ccpcsa.prune import PruneLimits, build_graph, find_groups
from ccpcsa.search.config import SearchConfig
from ccpcsa.search.space import RESIDUAL_PARAM, build_space, decode, describe_model, uniform_params


def test_stage_space_has_a_separate_ratio_for_residual_streams():
    cfg = SearchConfig()
    layout = describe_model("resnet20", 10, (3, 16, 16))
    assert len(layout.residual) == 3 and layout.inner_stages == ("layer1", "layer2", "layer3")
    space = build_space(cfg, layout)
    assert set(space) == {"groups_per_round", "cap_layer1", "cap_layer2", "cap_layer3",
                          RESIDUAL_PARAM}
    params = {"groups_per_round": 5, "cap_layer1": 0.1, "cap_layer2": 0.2, "cap_layer3": 0.3,
              RESIDUAL_PARAM: 0.05}
    schedule = decode(params, cfg, layout)
    assert schedule.residual_cap == 0.05 and schedule.stage_caps["layer2"] == 0.2
    assert set(uniform_params(cfg, layout, 4, 0.5)) == set(space)
    limits = PruneLimits(0.9, schedule.stage_caps, {}, 4, schedule.residual_cap)
    model = build_model("resnet20", 10, with_bam=True)
    spec = get_spec("resnet20")
    groups = find_groups(model, build_graph(model, torch.zeros(1, 3, 16, 16)),
                         spec.classifier(model), spec.stage_of)
    for g in groups:
        want = 0.05 if g.key in layout.residual else params[f"cap_{g.stage}"]
        assert limits.cap_for(g) == want, g.key


def test_without_residual_cap_or_per_layer_there_is_no_residual_parameter():
    layout = describe_model("resnet20", 10, (3, 16, 16))
    plain = build_space(replace(SearchConfig(), search_residual_cap=False), layout)
    assert RESIDUAL_PARAM not in plain and "cap_layer1" in plain
    per_layer = build_space(replace(SearchConfig(), per_layer=True), layout)
    assert RESIDUAL_PARAM not in per_layer and len(per_layer) == 1 + len(layout.layers)
