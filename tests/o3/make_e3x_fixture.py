"""Writes ``e3x_fixture.npz``: e3x's ``MultiHeadAttention`` outputs, parameters and inputs, for the comparison in
``test_o3_e3x_reference.py`` (which needs neither jax nor e3x).

Run it in a separate environment that has e3x (never in the project's venv)::

    python3 -m venv /tmp/e3x-venv && /tmp/e3x-venv/bin/pip install e3x "jax[cpu]"
    /tmp/e3x-venv/bin/python tests/o3/make_e3x_fixture.py

The comparison inputs use e3x's defaults where they matter: Cartesian component order, Racah-normalized harmonics,
``sinc`` radial functions times ``smooth_cutoff``, relative vectors ``positions[src] - positions[dst]``.
"""

import functools
import json
import pathlib

import e3x
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

CASES = {
    "l2_p2_biases_cutoff": dict(
        max_degree=2,
        pseudotensors=True,
        features=8,
        num_heads=2,
        qkv_features=8,
        out_features=8,
        num_basis=6,
        cutoff=2.5,
        basis_max_degree=2,
        rel_qk=True,
        rel_v=True,
        use_basis_bias=True,
        qkv_bias=True,
        softmax_cutoff=True,
    ),
    "l1_p1_heads3": dict(
        max_degree=1,
        pseudotensors=False,
        features=6,
        num_heads=3,
        qkv_features=12,
        out_features=5,
        num_basis=4,
        cutoff=3.0,
        basis_max_degree=1,
        rel_qk=True,
        rel_v=True,
        use_basis_bias=False,
        qkv_bias=False,
        softmax_cutoff=False,
    ),
    "l2_p1_basis1_plain_qk": dict(
        max_degree=2,
        pseudotensors=False,
        features=4,
        num_heads=2,
        qkv_features=4,
        out_features=4,
        num_basis=5,
        cutoff=3.0,
        basis_max_degree=1,
        rel_qk=False,
        rel_v=True,
        use_basis_bias=False,
        qkv_bias=False,
        softmax_cutoff=False,
    ),
    "l1_p2_no_relative": dict(
        max_degree=1,
        pseudotensors=True,
        features=6,
        num_heads=2,
        qkv_features=6,
        out_features=6,
        num_basis=4,
        cutoff=3.0,
        basis_max_degree=1,
        rel_qk=False,
        rel_v=False,
        use_basis_bias=False,
        qkv_bias=True,
        softmax_cutoff=False,
    ),
}
BATCH, TOKENS = 2, 7


def run_case(name: str, cfg: dict, rng: np.random.Generator, out: dict) -> None:
    p, c = (2 if cfg["pseudotensors"] else 1), (cfg["max_degree"] + 1) ** 2
    x = rng.normal(size=(BATCH, TOKENS, p, c, cfg["features"]))
    pos = rng.normal(size=(BATCH, TOKENS, 3))
    mask = rng.random((BATCH, TOKENS, TOKENS)) < 0.7
    mask |= np.eye(TOKENS, dtype=bool)
    r = pos[:, None, :, :] - pos[:, :, None, :]  # r[b, i, j] = pos[b, j] - pos[b, i]: key minus query
    basis = e3x.nn.basis(
        jnp.asarray(r),
        max_degree=cfg["basis_max_degree"],
        num=cfg["num_basis"],
        radial_fn=functools.partial(e3x.nn.sinc, limit=cfg["cutoff"]),
        cutoff_fn=functools.partial(e3x.nn.smooth_cutoff, cutoff=cfg["cutoff"]),
    )
    cutoff_value = (
        e3x.nn.smooth_cutoff(jnp.linalg.norm(r, axis=-1), cutoff=cfg["cutoff"]) if cfg["softmax_cutoff"] else None
    )
    adj_idx = jnp.broadcast_to(jnp.arange(TOKENS), (BATCH, TOKENS, TOKENS))
    module = e3x.nn.MultiHeadAttention(
        max_degree=cfg["max_degree"],
        include_pseudotensors=cfg["pseudotensors"],
        num_heads=cfg["num_heads"],
        qkv_features=cfg["qkv_features"],
        out_features=cfg["out_features"],
        use_relative_positional_encoding_qk=cfg["rel_qk"],
        use_relative_positional_encoding_v=cfg["rel_v"],
        use_basis_bias=cfg["use_basis_bias"],
        query_use_bias=cfg["qkv_bias"],
        key_use_bias=cfg["qkv_bias"],
        value_use_bias=cfg["qkv_bias"],
        param_dtype=jnp.float64,
    )
    call = dict(adj_idx=adj_idx, where=jnp.asarray(mask))
    params = module.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(x), basis, cutoff_value, **call)
    # Random values everywhere (e3x initializes biases to zero, which would hide a wrong bias mapping).
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5), params)
    y = module.apply(params, jnp.asarray(x), jnp.asarray(x), basis, cutoff_value, **call)
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    for path, leaf in flat:
        out[f"{name}/param/" + "/".join(k.key for k in path)] = np.asarray(leaf)
    out[f"{name}/x"], out[f"{name}/positions"], out[f"{name}/mask"] = x, pos, mask
    out[f"{name}/y"] = np.asarray(y)
    out[f"{name}/config"] = np.asarray(json.dumps(cfg))


def main() -> None:
    rng = np.random.default_rng(7)
    out: dict = {}
    for name, cfg in CASES.items():
        run_case(name, cfg, rng, out)
    u = rng.normal(size=(50, 3))
    out["harmonics/r"] = u
    out["harmonics/y"] = np.asarray(e3x.so3.spherical_harmonics(jnp.asarray(u), 3, normalization="racah"))
    out["clebsch_gordan/max_degree_3"] = np.asarray(e3x.so3.clebsch_gordan(3, 3, 3))
    out["versions"] = np.asarray(json.dumps({"e3x": e3x.__version__, "jax": jax.__version__}))
    path = pathlib.Path(__file__).with_name("e3x_fixture.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
