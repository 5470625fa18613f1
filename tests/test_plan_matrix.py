"""The lowered plan equals the module path over the regressor's configuration matrix.

Factors: pre-/post-norm x layernorm/rmsnorm x the encoder (the MLP encoder, ``num_cond_layers=0``, or two layers
with each positional backend) x the decoder self-attention's backend x its cross-attention's backend x one or two
observation tokens per step x sampler. The default run takes a pairwise covering subset (every pair of factor levels
appears in some case); ``-m slow`` runs the whole product. Each case drives :class:`StaticStreamingPolicy` (eager)
and :class:`StreamingPolicy` through the same calls: random row subsets, per-row resets, more than 20 wraps of every
ring; float64 actions agree to <= 1e-10 relative to their scale.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from layer_testing import rel_err
from plan_testing import BACKENDS, HORIZON, SAMPLERS, WINDOW, make_policy

from streamtx.nn.positional import PositionalAttention, eRoPE, make_positional
from streamtx.policy import StreamingPolicy
from streamtx.policy.static import StaticStreamingPolicy

FACTORS = {
    "norm_first": (True, False),
    "norm_module": ("layernorm", "rmsnorm"),
    "encoder": ("mlp", *BACKENDS),  # "mlp": num_cond_layers=0; else the encoder's positional backend
    "self_positional": BACKENDS,
    "cross_positional": BACKENDS,
    "tokens": (1, 2),
    "sampler": tuple(SAMPLERS),
}
SLOTS = 3


def pairwise_cases(factors: dict[str, tuple]) -> list[tuple]:
    """A deterministic greedy covering array of strength 2: every pair of levels of two factors is in some case."""
    names = list(factors)
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in factors[names[i]]
        for b in factors[names[j]]
    }
    cases = []
    product = list(itertools.product(*factors.values()))
    while uncovered:

        def gain(case: tuple) -> int:
            return sum((i, case[i], j, case[j]) in uncovered for i, j in itertools.combinations(range(len(case)), 2))

        best = max(product, key=gain)
        cases.append(best)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
    return cases


PAIRWISE = pairwise_cases(FACTORS)
FULL = [c for c in itertools.product(*FACTORS.values()) if c not in PAIRWISE]


def compare(reference: StreamingPolicy, static: StaticStreamingPolicy, steps: int = 140, seed: int = 0) -> float:
    """Drive both through the same calls; the max relative difference of all actions. Asserts that the stream
    wraps every ring at least 20 times (counting observation tokens per row)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = reference.dtype
    ref_state, state = reference.init_state(SLOTS), static.init_state(SLOTS)
    tokens = torch.zeros(SLOTS, dtype=torch.long)
    err = 0.0

    def observe(rows: list[int], s: int) -> None:
        obs = torch.randn(len(rows), s, reference.obs_dim, generator=gen, dtype=dtype)
        reference.observe(ref_state, obs, rows)
        static.observe(state, obs, rows)
        tokens[rows] += s

    for policy, st in ((reference, ref_state), (static, state)):
        policy.reset(st, None, seed=[5, 6, 7])
    observe(list(range(SLOTS)), 1)
    for t in range(steps):
        rows = torch.randperm(SLOTS, generator=gen)[: 1 + t % SLOTS].tolist()
        observe(rows, 1 + int(torch.randint(reference.max_tokens_per_step, (1,), generator=gen)))
        if t % 11 == 5:  # a per-row reset, then that row's first observation
            for policy, st in ((reference, ref_state), (static, state)):
                policy.reset(st, rows[:1], seed=t)
            observe(rows[:1], 1)
        if t % 3 == 0:
            err = max(err, rel_err(static.act(state, rows).to(dtype), reference.act(ref_state, rows).cpu()))
    wraps = int(tokens.min()) / max(HORIZON, WINDOW, reference.max_tokens_per_step)
    assert wraps >= 20, f"the stream wraps the rings only {wraps:.1f} times"
    return err


def _ids(case: tuple) -> str:
    norm_first, norm_module, encoder, self_pos, cross_pos, tokens, sampler = case
    return (
        f"{'pre' if norm_first else 'post'}-{norm_module}-enc_{encoder}-self_{self_pos}-cross_{cross_pos}"
        f"-S{tokens}-{sampler}"
    )


@pytest.mark.parametrize("case", PAIRWISE, ids=_ids)
def test_plan_equals_module_path_pairwise(case):
    reference = make_policy(case, seed=PAIRWISE.index(case))
    assert compare(reference, StaticStreamingPolicy(reference, buckets=[1, 2, 3])) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL, ids=_ids)
def test_plan_equals_module_path_full_matrix(case):
    reference = make_policy(case, seed=FULL.index(case))
    assert compare(reference, StaticStreamingPolicy(reference, buckets=[1, 2, 3])) <= 1e-10


def test_pairwise_subset_covers_every_pair():
    assert len(PAIRWISE) < 40
    for (i, a), (j, b) in itertools.combinations(enumerate(FACTORS), 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            assert any(case[i] == x and case[j] == y for case in PAIRWISE), (a, x, b, y)


def test_float32_representative():
    case = (False, "rmsnorm", "relative", "absolute", "rope", 2, "heun")
    reference = make_policy(case, dtype=torch.float32, seed=3)
    static = StaticStreamingPolicy(reference, buckets=[1, 2, 3])
    assert static.io_dtype == torch.float32
    assert compare(reference, static) <= 1e-5


def test_rope_frequencies_may_differ_between_layers():
    """Each decoder layer moves its own memory keys into the queries' frame (one call when all layers agree)."""
    reference = make_policy((True, "layernorm", "rope", "rope", "rope", 1, "euler"))
    layers = reference.model.decoder.layer_list
    for i, layer in enumerate(layers):
        for attn in (layer.self_attn, layer.multihead_attn):
            attn.positional = eRoPE(attn.num_heads, 2, 8, base=10.0 ** (i + 2))  # 2 copies of D4 per head
    static = StaticStreamingPolicy(reference, buckets=[1, 2, 3])
    assert compare(reference, static) <= 1e-10


def test_a_module_without_lowering_says_which():
    class Custom(PositionalAttention):
        pass

    reference = make_policy((True, "layernorm", "rope", "none", "rope", 1, "euler"))
    reference.model.decoder.layer_list[1].multihead_attn.positional = Custom()
    with pytest.raises(NotImplementedError, match="Custom.lower: this positional backend has no lowering"):
        StaticStreamingPolicy(reference)


@pytest.mark.parametrize(
    "case",
    [
        (False, "rmsnorm", "absolute", "relative", "absolute", 1, "euler"),
        (True, "layernorm", "relative", "absolute", "relative", 1, "euler"),
        (False, "layernorm", "mlp", "rope", "none", 1, "euler"),
    ],
    ids=_ids,
)
def test_the_reference_module_path_equals_the_batch_forward(case):
    """The plan's reference honours its own contract in the configurations the options open: the regressor's
    observe/denoise stream equals ``forward`` on the whole history since the reset (absolute ids count from it)."""
    model = make_policy(case).model
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 24, model.cond_rep.size, generator=gen, dtype=torch.float64)
    x = torch.randn(2, model.in_horizon, model.in_rep.size, generator=gen, dtype=torch.float64)
    k = torch.tensor([3.0, 700.0], dtype=torch.float64)
    state = model.init_state(2)
    err = 0.0
    with torch.no_grad():
        for t in range(z.shape[1]):
            model.observe(z[:, t : t + 1], state)
            err = max(err, rel_err(model.denoise(x, k, state), model(x, k, z[:, : t + 1])))
    assert err <= 1e-10


def test_compiled_plan_representative():
    """The plan compiled by inductor, on a configuration off the default path (post-norm, RMSNorm, relative bias in
    the encoder, absolute tables in the decoder, two tokens per step): float64, the same numbers."""
    case = (False, "rmsnorm", "relative", "absolute", "absolute", 2, "euler")
    reference = make_policy(case, seed=4)
    static = StaticStreamingPolicy(reference, buckets=[3], compile=True)
    assert static.compiled
    assert compare(reference, static, steps=130) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowered_positional_tables_equal_their_modules(backend):
    """Scores of queries at ``q_pos`` and keys at ``k_pos``, and the one-position identities of
    :class:`~streamtx.nn.lowered.Positional`, against the module's own ``encode_query``/``encode_key``/``score_bias``
    (float64, random tables)."""
    heads, copies, order, b, lq, lk = 2, 2, 8, 3, 4, 6
    module = make_positional(backend, heads, copies, order).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    table = module.lower(torch.float64)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, heads, copies * order, generator=gen, dtype=torch.float64)
    k = torch.randn(b, lk, heads, copies * order, generator=gen, dtype=torch.float64)
    q_pos, k_pos = torch.randint(0, 3000, (b, lq), generator=gen), torch.randint(0, 3000, (b, lk), generator=gen)

    def scores(qe: torch.Tensor, ke: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = torch.einsum("bqhd,bkhd->bhqk", qe, ke)
        return s if bias is None else s + bias

    def module_scores(qp: torch.Tensor) -> torch.Tensor:
        qe = module.encode_query(q.transpose(1, 2), qp).transpose(1, 2)
        ke = module.encode_key(k.transpose(1, 2), k_pos).transpose(1, 2)
        return scores(qe, ke, module.score_bias(qp, k_pos))

    lowered = scores(table.encode(q, q_pos), table.encode(k, k_pos), table.score_bias(q_pos, k_pos))
    assert rel_err(lowered, module_scores(q_pos)) <= 1e-10
    now = torch.randint(0, 3000, (b,), generator=gen)
    offset = table.query_offset(now)
    framed = scores(
        q if offset is None else q + offset,
        table.frame_keys(table.encode(k, k_pos), now),
        table.score_bias(now[:, None], k_pos),
    )
    assert rel_err(framed, module_scores(now[:, None].expand(b, lq))) <= 1e-10
    at_now = table.frame_keys(table.encode(k, now[:, None].expand(b, lk)), now)
    assert rel_err(at_now, k if offset is None else k + offset) <= 1e-12
    assert table.has_score_bias == (backend == "relative")
