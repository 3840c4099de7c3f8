"""Pieces of the default model's training recipe: copying targets, the attention priors, the auxiliary
attention loss (checked against the model's own attention weights) and the recipe's command-line overrides."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from script_modules import import_script

tdm = import_script("train_default_model")


def test_induction_targets_point_after_the_latest_matching_pair() -> None:
    #        0  1  2  3  4  5  6  7  8
    ids = [1, 5, 6, 7, 5, 6, 7, 5, 6]
    out = tdm.induction_targets(ids)
    assert len(out) == len(ids) - 1
    # position 5 holds (5, 6) seen at 1..2 and followed by 7 both times: look at 3
    assert out[5] == 3
    # position 6 holds (6, 7), last seen at 2..3, followed by 5 both times: look at 4
    assert out[6] == 4
    # position 7 holds (7, 5), last seen at 3..4, followed by 6: look at 5 (the latest match, not 1)
    assert out[7] == 5
    assert out[:4] == [-1, -1, -1, -1]  # nothing repeated yet


def test_induction_targets_skip_wrong_continuations_and_pads() -> None:
    assert tdm.induction_targets([1, 5, 6, 8, 5, 6, 9]) == [-1] * 6  # (5, 6) repeats but 8 != 9
    pad = tdm.PAD
    assert tdm.induction_targets([1, pad, pad, pad, pad]) == [-1] * 4


def _model(**changes):
    p = replace(tdm.PRESETS["smoke"], attention_bias=True, **changes)
    torch.manual_seed(0)
    return tdm.build_model(p, "eager"), p


def test_previous_token_prior_makes_layer0_heads_look_one_back() -> None:
    model, p = _model(prev_token_heads=1)
    tdm.init_priors(model, p)
    ids = torch.randint(4, p.vocab, (2, 48))
    att = model(input_ids=ids, output_attentions=True).attentions[0]  # (B, H, T, T)
    t = torch.arange(8, 48)
    assert att[:, 0, t, t - 1].mean() > 0.9          # the prior head
    assert att[:, 1, t, t - 1].mean() < 0.5          # an untouched head


def test_priors_refuse_impossible_settings() -> None:
    model, p = _model(prev_token_heads=1)
    with pytest.raises(ValueError, match="attention_bias"):
        tdm.init_priors(model, replace(p, attention_bias=False))
    with pytest.raises(ValueError, match="prev_token_heads must be"):
        tdm.init_priors(model, replace(p, prev_token_heads=p.heads))


def test_mimetic_prior_makes_value_output_a_partial_identity() -> None:
    model, p = _model(mimetic=True)
    tdm.init_priors(model, p)
    attn = model.model.layers[1].self_attn
    d = p.hidden // p.heads
    # each query head's output projection is its KV head's value projection transposed / group size
    assert torch.allclose(attn.o_proj.weight[:, :d], attn.v_proj.weight[:d].T / (p.heads // p.kv_heads))
    vo = attn.v_proj.weight[:d] @ attn.v_proj.weight[:d].T
    assert torch.allclose(vo, torch.eye(d), atol=1e-5)  # orthonormal rows


def test_induction_loss_equals_the_heads_attention() -> None:
    """The loss recomputes the chosen heads' attention from hooked q/k projections; it must equal
    -log(attention weight on the target) taken from the model's own eager attention."""
    model, p = _model()
    heads = ((1, 0), (1, 3))
    loss_fn = tdm.InductionLoss(model, heads)
    span = torch.randint(4, p.vocab, (12,)).tolist()
    ids = [tdm.BOS] + span * 3
    targets = torch.tensor([tdm.induction_targets(ids)])
    x = torch.tensor([ids[:-1]])
    att = model(input_ids=x, output_attentions=True).attentions[1][0]  # (H, T, T)
    loss = loss_fn(targets)
    mask = targets[0] >= 0
    pos = torch.arange(x.shape[1])[mask]
    expected = torch.stack([-att[h, pos, targets[0][mask]].log().mean() for _, h in heads]).mean()
    assert mask.sum() > 10
    assert torch.allclose(loss, expected, rtol=1e-4)
    loss.backward()  # differentiable: the gradient reaches the query projection
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_induction_loss_is_zero_without_targets() -> None:
    model, _ = _model()
    loss_fn = tdm.InductionLoss(model, ((1, 0),))
    model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert loss_fn(torch.full((1, 4), -1)).item() == 0.0


def test_recipe_overrides_reject_unknown_fields_and_bad_values(capsys) -> None:
    ap = tdm.build_parser()
    for flag, message in (("layerz=4", "FIELD one of"), ("layers=four", "not a valid int")):
        with pytest.raises(SystemExit):
            tdm.recipe(ap.parse_args(["--preset", "cpu", "--set", flag]), ap)
        assert message in capsys.readouterr().err
    args = ap.parse_args(["--preset", "cpu", "--set", "layers=6", "--set", "curriculum=((1.0, 512, 4),)"])
    p = tdm.recipe(args, ap)
    assert p.layers == 6 and p.curriculum == ((1.0, 512, 4),)


def test_probe_set_spans_cover_exactly_the_answers() -> None:
    from tokenizers import Tokenizer

    from kvcache.bench.tasks import Filler, make_task
    from kvcache.models import DEFAULT_MODEL_DIR

    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    filler = Filler(["The sky is blue.", "Water is wet."],
                    lambda xs: [len(e.ids) for e in tok.encode_batch(xs, add_special_tokens=False)])
    probes = tdm.probe_set(tok, filler, (128,), 3, torch.device("cpu"))
    ids, spans = probes.passkey[128]
    for i, (a, e) in enumerate(spans):
        ex = make_task("passkey", filler, 128, seed=tdm.PROBE_SEED_BASE + 128 * 1000 + i)
        assert tok.decode(ids[i, a:e].tolist()) == ex.answer
        assert (ids[i, e:] == tdm.PAD).all()  # right padding only
    copy = probes.copy
    assert copy.shape == (3, 97) and torch.equal(copy[:, 1:49], copy[:, 49:])
