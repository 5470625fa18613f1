"""Writes the e3x reference fixtures: e3x's ``MultiHeadAttention`` outputs, with its parameters and inputs, for the
comparisons in ``test_o3_e3x_reference.py`` and ``test_o3_e3x_cross_reference.py`` (which need neither jax nor e3x).

* ``e3x_fixture.npz``: self-attention over all token pairs with a ``where`` mask, e3x's own ``sinc`` basis, and e3x's
  harmonics and Clebsch-Gordan table up to degree 3.
* ``e3x_cross_fixture.npz``: cross-attention (query and key/value tokens with their own counts, channels, degrees and
  parities), with a basis computed elsewhere, dense index lists with ``where``, sparse index lists with
  ``num_segments``, given cutoff values, and e3x's output-parity rule.

Run it in a separate environment that has e3x (never in the project's venv)::

    python3 -m venv /work/venvs/jax && /work/venvs/jax/bin/pip install e3x==1.0.2 jax flax
    /work/venvs/jax/bin/python tests/o3/make_e3x_fixtures.py

Written with e3x 1.0.2, jax 0.10.2, flax 0.12.8 (e3x's and jax's versions are recorded in each file). The inputs use
e3x's defaults where they matter: Cartesian component order, Racah-normalized harmonics, relative vectors
``positions[src] - positions[dst]``.
"""

import functools
import json
import pathlib

import e3x
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

# Each case is its base with some entries replaced; the test reads the whole case back from the file's "config".
SELF_BASE = (
    dict(max_degree=1, pseudotensors=False, features=6, num_heads=2, qkv_features=6, out_features=6)
    | dict(num_basis=4, cutoff=3.0, basis_max_degree=1)
    | dict(rel_qk=True, rel_v=True, use_basis_bias=False, qkv_bias=False, softmax_cutoff=False)
)
SELF_CASES = {
    "l2_p2_biases_cutoff": dict(max_degree=2, pseudotensors=True, features=8, qkv_features=8, out_features=8)
    | dict(num_basis=6, cutoff=2.5, basis_max_degree=2, use_basis_bias=True, qkv_bias=True, softmax_cutoff=True),
    "l1_p1_heads3": dict(num_heads=3, qkv_features=12, out_features=5),
    "l2_p1_basis1_plain_qk": dict(max_degree=2, features=4, qkv_features=4, out_features=4, num_basis=5, rel_qk=False),
    "l1_p2_no_relative": dict(pseudotensors=True, rel_qk=False, rel_v=False, qkv_bias=True),
}
BATCH, TOKENS = 2, 7  # self-attention

# q, kv, out: (max_degree, pseudotensors, features). pairs: "all" (adj_idx over every key, where = a random mask),
# "adj" (random dense lists with padding), "sparse" (random sparse lists with padding). basis: "sinc" (the layer's
# own, from positions) or "bernstein" (given). cutoff_value: "smooth" (from positions), "given" (random positive
# factors) or None.
CROSS_BASE = dict(heads=2, qkv=4, num_basis=4, cutoff=3.0, basis_max_degree=1) | dict(
    rel_qk=True, rel_v=True, basis_bias=True, qkv_bias=True, pairs="all", basis="bernstein", cutoff_value="given"
)
CROSS_CASES = {
    "q_l2p2_kv_l1p1_sinc": dict(q=(2, True, 6), kv=(1, False, 4), out=(2, True, 5))
    | dict(qkv=8, num_basis=6, cutoff=2.5, basis_max_degree=2, basis="sinc", cutoff_value="smooth"),
    "q_l1p1_kv_l2p2_given_basis_adj": dict(q=(1, False, 4), kv=(2, True, 6), out=(3, False, 4))
    | dict(heads=3, qkv=6, num_basis=5, basis_bias=False, qkv_bias=False, pairs="adj"),
    "q_l2p1_kv_l1p2_sparse_no_rel_v": dict(q=(2, False, 5), kv=(1, True, 3), out=(1, True, 4))
    | dict(basis_max_degree=2, rel_v=False, pairs="sparse"),
    "q_l1p2_kv_l1p1_scalar_out_rule": dict(q=(1, True, 4), kv=(1, False, 4), out=(0, True, 3))
    | dict(heads=1, rel_qk=False, basis_bias=False, qkv_bias=False, basis="sinc", cutoff_value=None),
}
N, M = 5, 8  # cross-attention: query and key/value tokens


def _case(base: dict, overrides: dict) -> dict:
    """The base with the overrides, keys in the order (layouts first, then the base's) that the files record."""
    layouts = {k: overrides[k] for k in ("q", "kv", "out") if k in overrides}
    return {**layouts, **base, **overrides}


def _features(rng: np.random.Generator, count: int, layout: tuple) -> np.ndarray:
    degree, pseudo, features = layout
    return rng.normal(size=(BATCH, count, 2 if pseudo else 1, (degree + 1) ** 2, features))


def _attend(
    name: str,
    spec: dict,
    xq: np.ndarray,
    xkv: np.ndarray,
    r: np.ndarray,
    call: dict,
    rng: np.random.Generator,
    out: dict,
) -> tuple:
    """e3x's attention of ``xq`` over ``xkv`` for a case in the cross vocabulary, with random parameters (stored in
    ``out``); returns the output, the basis and the cutoff values (``None`` for none) of the relative vectors ``r``."""
    if spec["basis"] == "sinc":
        radial = functools.partial(e3x.nn.sinc, limit=spec["cutoff"])
    else:
        radial = e3x.nn.reciprocal_bernstein
    basis = e3x.nn.basis(
        jnp.asarray(r),
        max_degree=spec["basis_max_degree"],
        num=spec["num_basis"],
        radial_fn=radial,
        cutoff_fn=functools.partial(e3x.nn.smooth_cutoff, cutoff=spec["cutoff"]),
    )
    if spec["cutoff_value"] == "smooth":
        cutoff_value = e3x.nn.smooth_cutoff(jnp.linalg.norm(r, axis=-1), cutoff=spec["cutoff"])
    elif spec["cutoff_value"] == "given":
        cutoff_value = jnp.asarray(rng.uniform(0.2, 1.0, size=r.shape[:-1]))
    else:
        cutoff_value = None
    module = e3x.nn.MultiHeadAttention(
        max_degree=spec["out"][0],
        include_pseudotensors=spec["out"][1],
        num_heads=spec["heads"],
        qkv_features=spec["qkv"],
        out_features=spec["out"][2],
        use_relative_positional_encoding_qk=spec["rel_qk"],
        use_relative_positional_encoding_v=spec["rel_v"],
        use_basis_bias=spec["basis_bias"],
        param_dtype=jnp.float64,
        **dict.fromkeys(("query_use_bias", "key_use_bias", "value_use_bias"), spec["qkv_bias"]),
    )
    args = (jnp.asarray(xq), jnp.asarray(xkv), basis, cutoff_value)
    params = module.init(jax.random.PRNGKey(0), *args, **call)
    # Random values everywhere (e3x initializes biases to zero, which would hide a wrong bias mapping).
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5), params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"])[0]:
        out[f"{name}/param/" + "/".join(k.key for k in path)] = np.asarray(leaf)
    return module.apply(params, *args, **call), basis, cutoff_value


def self_case(name: str, cfg: dict, rng: np.random.Generator, out: dict) -> None:
    """Self-attention over all pairs: the cross case with ``kv = q``, a ``where`` mask and the ``sinc`` basis."""
    layout = (cfg["max_degree"], cfg["pseudotensors"], cfg["features"])
    x = _features(rng, TOKENS, layout)
    pos = rng.normal(size=(BATCH, TOKENS, 3))
    mask = rng.random((BATCH, TOKENS, TOKENS)) < 0.7
    mask |= np.eye(TOKENS, dtype=bool)
    r = pos[:, None, :, :] - pos[:, :, None, :]  # r[b, i, j] = pos[b, j] - pos[b, i]: key minus query
    spec = {
        **cfg,
        "out": (cfg["max_degree"], cfg["pseudotensors"], cfg["out_features"]),
        "heads": cfg["num_heads"],
        "qkv": cfg["qkv_features"],
        "basis_bias": cfg["use_basis_bias"],
        "basis": "sinc",
        "cutoff_value": "smooth" if cfg["softmax_cutoff"] else None,
    }
    call = dict(adj_idx=jnp.broadcast_to(jnp.arange(TOKENS), (BATCH, TOKENS, TOKENS)), where=jnp.asarray(mask))
    y, _, _ = _attend(name, spec, x, x, r, call, rng, out)
    out[f"{name}/x"], out[f"{name}/positions"], out[f"{name}/mask"] = x, pos, mask
    out[f"{name}/y"] = np.asarray(y)
    out[f"{name}/config"] = np.asarray(json.dumps(cfg))


def cross_case(name: str, cfg: dict, rng: np.random.Generator, out: dict) -> None:
    xq, xkv = _features(rng, N, cfg["q"]), _features(rng, M, cfg["kv"])
    pq, pkv = rng.normal(size=(BATCH, N, 3)), rng.normal(size=(BATCH, M, 3))
    rows = np.arange(BATCH)[:, None]
    call: dict = {}
    if cfg["pairs"] == "sparse":
        num_pairs = 20
        dst = np.sort(rng.integers(0, N, size=(BATCH, num_pairs)), axis=-1)  # sorted: indices_are_sorted=True
        src = rng.integers(0, M, size=(BATCH, num_pairs))
        dst[:, -3:], src[:, -3:] = N, M  # padding at the end keeps dst sorted
        r = pkv[rows, np.minimum(src, M - 1)] - pq[rows, np.minimum(dst, N - 1)]  # (B, E, 3)
        call.update(dst_idx=jnp.asarray(dst), src_idx=jnp.asarray(src), num_segments=N, indices_are_sorted=True)
        out[f"{name}/dst_idx"], out[f"{name}/src_idx"] = dst, src
    else:
        if cfg["pairs"] == "all":
            adj = np.broadcast_to(np.arange(M), (BATCH, N, M)).copy()
            where = rng.random((BATCH, N, M)) < 0.7
        else:
            adj = rng.integers(0, M, size=(BATCH, N, 4))
            adj[:, :, -1] = M  # one padding entry per query
            where = (rng.random((BATCH, N, 4)) < 0.8) & (adj < M)
        where[:, :, 0] = True  # every query sees a key (e3x divides by zero otherwise)
        r = pkv[rows[:, :, None], np.minimum(adj, M - 1)] - pq[:, :, None, :]  # (B, N, A, 3)
        call.update(adj_idx=jnp.asarray(adj), where=jnp.asarray(where))
        out[f"{name}/adj_idx"], out[f"{name}/where"] = adj, where
    y, basis, cutoff_value = _attend(name, cfg, xq, xkv, r, call, rng, out)
    out[f"{name}/x"], out[f"{name}/kv"] = xq, xkv
    out[f"{name}/positions"], out[f"{name}/kv_positions"] = pq, pkv
    out[f"{name}/basis"] = np.asarray(basis)
    if cutoff_value is not None:
        out[f"{name}/cutoff_value"] = np.asarray(cutoff_value)
    out[f"{name}/y"] = np.asarray(y)
    out[f"{name}/config"] = np.asarray(json.dumps(cfg))


def _write(filename: str, out: dict) -> None:
    out["versions"] = np.asarray(json.dumps({"e3x": e3x.__version__, "jax": jax.__version__}))
    path = pathlib.Path(__file__).with_name(filename)
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    rng, out = np.random.default_rng(7), {}
    for name, overrides in SELF_CASES.items():
        self_case(name, _case(SELF_BASE, overrides), rng, out)
    u = rng.normal(size=(50, 3))
    out["harmonics/r"] = u
    out["harmonics/y"] = np.asarray(e3x.so3.spherical_harmonics(jnp.asarray(u), 3, normalization="racah"))
    out["clebsch_gordan/max_degree_3"] = np.asarray(e3x.so3.clebsch_gordan(3, 3, 3))
    _write("e3x_fixture.npz", out)
    rng, out = np.random.default_rng(11), {}
    for name, overrides in CROSS_CASES.items():
        cross_case(name, _case(CROSS_BASE, overrides), rng, out)
    _write("e3x_cross_fixture.npz", out)


if __name__ == "__main__":
    main()
