"""The lm-eval backend (``--model kvcache``) on a tiny random model: log-likelihoods equal a direct forward
pass, rolling windows add up, generation equals kvcache.generate, a policy changes what is scored, and the
``lm_eval`` command line finds the model through the exported task files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kvcache import KVCacheError, generate
from kvcache.lmeval import KVCacheLM
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer

CONTEXTS = ["The quick brown fox", "a", "Hello there, world. ", ""]
CONTINUATIONS = [" jumps over", "bc", "Bye", "Start"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=3)


def lm(model, tokenizer, **kwargs) -> KVCacheLM:
    return KVCacheLM(model, tokenizer=tokenizer, **kwargs)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T-1,) log p(ids[t] | ids[:t]) from one forward pass without a cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def expected_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    if context:
        whole = tokenizer(context + continuation)["input_ids"]
        n_ctx = len(tokenizer(context.rstrip())["input_ids"])
    else:  # lm-eval conditions an empty context on the prefix (BOS) token
        whole = [tokenizer.bos_token_id] + tokenizer(continuation, add_special_tokens=False)["input_ids"]
        n_ctx = 1
    return float(direct_logprobs(model, whole)[n_ctx - 1:].sum())


def test_registered_under_kvcache():
    assert get_model("kvcache") is KVCacheLM


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_a_direct_forward(model, tokenizer, batch_size):
    # Full cache: the continuation scored step by step through the cache equals one forward pass (left-padded
    # batches of 3 included).
    reqs = [request("loglikelihood", c, x) for c, x in zip(CONTEXTS, CONTINUATIONS, strict=True)]
    got = lm(model, tokenizer, batch_size=batch_size).loglikelihood(reqs)
    for (ctx, cont), (logprob, greedy) in zip(zip(CONTEXTS, CONTINUATIONS, strict=True), got, strict=True):
        assert logprob == pytest.approx(expected_loglikelihood(model, tokenizer, ctx, cont), abs=1e-4)
        assert greedy is False  # random weights never pick these strings greedily


def test_is_greedy_for_the_greedy_continuation(model, tokenizer):
    ctx = tokenizer("Hello there")["input_ids"]
    greedy_ids = generate(model, tokenizer, "Hello there", max_new_tokens=5, eos_token_id=[]).token_ids[0]
    other = greedy_ids[:-1] + [(greedy_ids[-1] + 1) % 128]
    (logprob, greedy), (_, other_greedy) = lm(model, tokenizer)._loglikelihood_tokens(
        [(None, ctx, greedy_ids), (None, ctx, other)])
    assert greedy is True and other_greedy is False
    assert logprob == pytest.approx(float(direct_logprobs(model, ctx + greedy_ids)[len(ctx) - 1:].sum()),
                                    abs=1e-4)


def test_a_policy_changes_the_scores(model, tokenizer):
    # The context is compressed to 4 tokens before the continuation is scored against it.
    ctx, cont = "The quick brown fox jumps over the lazy dog. " * 2, "The end of it"
    full = lm(model, tokenizer).loglikelihood([request("loglikelihood", ctx, cont)])[0][0]
    small = lm(model, tokenizer, cache="streaming:tokens=4,sinks=1").loglikelihood(
        [request("loglikelihood", ctx, cont)])[0][0]
    assert full == pytest.approx(expected_loglikelihood(model, tokenizer, ctx, cont), abs=1e-4)
    assert abs(small - full) > 1e-2


@pytest.mark.parametrize("max_length", [512, 16])
def test_loglikelihood_rolling_sums_the_windows(model, tokenizer, max_length):
    text = "Rolling windows cover every token exactly once, with the most context each can have."
    got = lm(model, tokenizer, max_length=max_length, batch_size=2).loglikelihood_rolling(
        [request("loglikelihood_rolling", text), request("loglikelihood_rolling", text[:9])])
    for t, value in zip([text, text[:9]], got, strict=True):
        tokens = tokenizer(t, add_special_tokens=False)["input_ids"]
        expected = 0.0
        windows = list(get_rolling_token_windows(tokens, tokenizer.bos_token_id, max_length, 1))
        assert (len(windows) > 1) == (max_length == 16 and t == text)
        for ctx, cont in map(make_disjoint_window, windows):
            expected += float(direct_logprobs(model, ctx + cont)[len(ctx) - 1:].sum())
        assert value == pytest.approx(expected, abs=1e-3)


# Keyformer's Gumbel noise is drawn per batch shape, so a policy row equals a lone generate at batch size 1
@pytest.mark.parametrize(("cache", "batch_size"), [("full", 2), ("keyformer:budget=0.5", 1)])
def test_generate_until_equals_kvcache_generate(model, tokenizer, cache, batch_size):
    gen_a = {"until": ["e"], "max_gen_toks": 6, "do_sample": False}
    gen_b = {"until": [], "max_gen_toks": 3}
    reqs = [request("generate_until", "Once upon", gen_a), request("generate_until", "ab", gen_b),
            request("generate_until", "A longer prompt here", gen_a)]
    got = lm(model, tokenizer, batch_size=batch_size, cache=cache).generate_until(reqs)
    for req, text in zip(reqs, got, strict=True):
        ctx, kw = req.args
        ref = generate(model, tokenizer, ctx, cache=cache, max_new_tokens=kw["max_gen_toks"],
                       stop=kw["until"] or None).texts[0]
        assert text == ref
        assert not any(s in text for s in kw["until"])


def test_bad_arguments_are_refused(model, tokenizer):
    with pytest.raises(KVCacheError, match="window.*quoted"):
        KVCacheLM(model, tokenizer=tokenizer, cache="keyformer:budget=0.5", window=0.3)
    with pytest.raises(KVCacheError, match="batch_size"):
        KVCacheLM(model, tokenizer=tokenizer, batch_size="auto")
    with pytest.raises(ValueError, match="budget"):
        KVCacheLM(model, tokenizer=tokenizer, cache="keyformer:budget=2")
    with pytest.raises(KVCacheError, match="tokenizer"):
        KVCacheLM(model)
    short = lm(model, tokenizer, max_length=8)
    with pytest.raises(KVCacheError, match="max_length=8"):
        short.loglikelihood([request("loglikelihood", "a long context", " and more")])
    with pytest.raises(KVCacheError, match="max_gen_toks"):
        short.generate_until([request("generate_until", "abc", {"until": [], "max_gen_toks": 8})])
    with pytest.raises(KVCacheError, match="num_beams"):
        short.generate_until([request("generate_until", "abc", {"until": [], "num_beams": 2})])


def test_lm_eval_command_line_finds_the_model_through_the_task_files(tmp_path):
    # What `lm_eval --model kvcache --tasks DIR` does before it builds the model: read the task YAML with its
    # functions resolved (importing kvcache.lmeval), then look the model up. Run in a fresh interpreter.
    from kvcache.bench.lmeval_tasks import export_lmeval_tasks

    export_lmeval_tasks(tmp_path, tiny_tokenizer(), tasks=["passkey"], contexts=[64], n=1)
    script = (
        "import sys\n"
        "from lm_eval.api.registry import get_model\n"
        "from lm_eval.tasks._yaml_loader import load_yaml\n"
        "assert 'kvcache.lmeval' not in sys.modules\n"
        "try:\n    get_model('kvcache')\nexcept ValueError:\n    pass\n"
        "else:\n    raise SystemExit('registered too early')\n"
        f"cfg = load_yaml({str(tmp_path / 'kvcache_passkey.yaml')!r}, resolve_func=True)\n"
        "print(get_model('kvcache').__module__, cfg['task'])\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kvcache.lmeval.model", "kvcache_passkey"]
