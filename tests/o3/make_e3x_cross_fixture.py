"""Writes ``e3x_cross_fixture.npz``: e3x's ``MultiHeadAttention`` as cross-attention (query and key/value tokens with
their own counts, channels, degrees and parities), with a basis computed elsewhere, dense index lists with ``where``,
sparse index lists with ``num_segments``, given cutoff values, and e3x's output-parity rule; compared in
``test_o3_e3x_cross_reference.py`` (which needs neither jax nor e3x).

Run it in a separate environment that has e3x (never in the project's venv)::

    python3 -m venv /work/venvs/jax && /work/venvs/jax/bin/pip install e3x==1.0.2 jax flax
    /work/venvs/jax/bin/python tests/o3/make_e3x_cross_fixture.py

Written with e3x 1.0.2, jax 0.10.2, flax 0.12.8 (recorded in the file).
"""

import functools
import json
import pathlib

import e3x
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

BATCH, N, M = 2, 5, 8

# pairs: "all" (adj_idx over every key, where = a random mask), "adj" (random dense lists with padding),
# "sparse" (random sparse lists with padding). basis: "sinc" (the layer's own, from positions) or "bernstein" (given).
# cutoff: "smooth" (from positions), "given" (random positive factors) or None.
CASES = {
    "q_l2p2_kv_l1p1_sinc": dict(
        q=(2, True, 6),
        kv=(1, False, 4),
        out=(2, True, 5),
        heads=2,
        qkv=8,
        num_basis=6,
        cutoff=2.5,
        basis_max_degree=2,
        rel_qk=True,
        rel_v=True,
        basis_bias=True,
        qkv_bias=True,
        pairs="all",
        basis="sinc",
        cutoff_value="smooth",
    ),
    "q_l1p1_kv_l2p2_given_basis_adj": dict(
        q=(1, False, 4),
        kv=(2, True, 6),
        out=(3, False, 4),
        heads=3,
        qkv=6,
        num_basis=5,
        cutoff=3.0,
        basis_max_degree=1,
        rel_qk=True,
        rel_v=True,
        basis_bias=False,
        qkv_bias=False,
        pairs="adj",
        basis="bernstein",
        cutoff_value="given",
    ),
    "q_l2p1_kv_l1p2_sparse_no_rel_v": dict(
        q=(2, False, 5),
        kv=(1, True, 3),
        out=(1, True, 4),
        heads=2,
        qkv=4,
        num_basis=4,
        cutoff=3.0,
        basis_max_degree=2,
        rel_qk=True,
        rel_v=False,
        basis_bias=True,
        qkv_bias=True,
        pairs="sparse",
        basis="bernstein",
        cutoff_value="given",
    ),
    "q_l1p2_kv_l1p1_scalar_out_rule": dict(
        q=(1, True, 4),
        kv=(1, False, 4),
        out=(0, True, 3),
        heads=1,
        qkv=4,
        num_basis=4,
        cutoff=3.0,
        basis_max_degree=1,
        rel_qk=False,
        rel_v=True,
        basis_bias=False,
        qkv_bias=False,
        pairs="all",
        basis="sinc",
        cutoff_value=None,
    ),
}


def _features(rng: np.random.Generator, count: int, layout: tuple) -> np.ndarray:
    degree, pseudo, features = layout
    return rng.normal(size=(BATCH, count, 2 if pseudo else 1, (degree + 1) ** 2, features))


def _basis(kind: str, r: np.ndarray, cfg: dict) -> jnp.ndarray:
    radial = functools.partial(e3x.nn.sinc, limit=cfg["cutoff"]) if kind == "sinc" else e3x.nn.reciprocal_bernstein
    return e3x.nn.basis(
        jnp.asarray(r),
        max_degree=cfg["basis_max_degree"],
        num=cfg["num_basis"],
        radial_fn=radial,
        cutoff_fn=functools.partial(e3x.nn.smooth_cutoff, cutoff=cfg["cutoff"]),
    )


def run_case(name: str, cfg: dict, rng: np.random.Generator, out: dict) -> None:
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
    basis = _basis(cfg["basis"], r, cfg)
    if cfg["cutoff_value"] == "smooth":
        cutoff_value = e3x.nn.smooth_cutoff(jnp.linalg.norm(r, axis=-1), cutoff=cfg["cutoff"])
    elif cfg["cutoff_value"] == "given":
        cutoff_value = jnp.asarray(rng.uniform(0.2, 1.0, size=r.shape[:-1]))
    else:
        cutoff_value = None
    module = e3x.nn.MultiHeadAttention(
        max_degree=cfg["out"][0],
        include_pseudotensors=cfg["out"][1],
        num_heads=cfg["heads"],
        qkv_features=cfg["qkv"],
        out_features=cfg["out"][2],
        use_relative_positional_encoding_qk=cfg["rel_qk"],
        use_relative_positional_encoding_v=cfg["rel_v"],
        use_basis_bias=cfg["basis_bias"],
        query_use_bias=cfg["qkv_bias"],
        key_use_bias=cfg["qkv_bias"],
        value_use_bias=cfg["qkv_bias"],
        param_dtype=jnp.float64,
    )
    args = (jnp.asarray(xq), jnp.asarray(xkv), basis, cutoff_value)
    params = module.init(jax.random.PRNGKey(0), *args, **call)
    # Random values everywhere (e3x initializes biases to zero, which would hide a wrong bias mapping).
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5), params)
    y = module.apply(params, *args, **call)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"])[0]:
        out[f"{name}/param/" + "/".join(k.key for k in path)] = np.asarray(leaf)
    out[f"{name}/x"], out[f"{name}/kv"] = xq, xkv
    out[f"{name}/positions"], out[f"{name}/kv_positions"] = pq, pkv
    out[f"{name}/basis"] = np.asarray(basis)
    if cutoff_value is not None:
        out[f"{name}/cutoff_value"] = np.asarray(cutoff_value)
    out[f"{name}/y"] = np.asarray(y)
    out[f"{name}/config"] = np.asarray(json.dumps(cfg))


def main() -> None:
    rng = np.random.default_rng(11)
    out: dict = {}
    for name, cfg in CASES.items():
        run_case(name, cfg, rng, out)
    out["versions"] = np.asarray(json.dumps({"e3x": e3x.__version__, "jax": jax.__version__}))
    path = pathlib.Path(__file__).with_name("e3x_cross_fixture.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
