"""Declared symmetries: the quadruped example is K4 with the documented actions, the Reacher declaration equals the
task's representations, a checkpoint-style round trip keeps everything, and malformed declarations are rejected with
messages that name the place."""

from pathlib import Path

import numpy as np
import pytest

from streamtx.data import SymmetrySpec, SymmetrySpecError
from streamtx.tasks import task_representations

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_quadruped_example_is_k4_acting_on_legs():
    spec = SymmetrySpec.load(EXAMPLES / "quadruped" / "symmetry.toml")
    obs, act = spec.representations()
    assert spec.group.order == 4 and obs.size == 36 and act.size == 12 and obs.group is act.group
    sagittal = act(spec.group.generators[0])
    q = np.arange(1.0, 13.0)  # LF (1, 2, 3), RF (4, 5, 6), LH, RH
    np.testing.assert_array_equal(sagittal @ q, [-4, 5, 6, -1, 2, 3, -10, 11, 12, -7, 8, 9])
    both = spec.group.mul[spec.group.generators[0], spec.group.generators[1]]
    np.testing.assert_array_equal(np.diag(obs(both))[30:33], [-1, -1, 1])  # angular velocity: only wz kept
    assert all(np.allclose(obs(g) @ obs(g), np.eye(36)) for g in range(4))  # every element an involution


def test_reacher_declaration_equals_the_task_and_round_trips():
    spec = SymmetrySpec.load(EXAMPLES / "reacher" / "symmetry.toml")
    obs, act = spec.representations()
    task_obs, task_act = task_representations("reacher")
    np.testing.assert_array_equal(obs.matrices, task_obs.matrices)
    np.testing.assert_array_equal(act.matrices, task_act.matrices)
    again = SymmetrySpec.from_dict(spec.to_dict())
    np.testing.assert_array_equal(again.representations()[0].matrices, obs.matrices)
    assert again.to_dict() == spec.to_dict()


def _spec(**override):
    table = {
        "generators": ["mirror"],
        "observation": [{"name": "q", "size": 2, "permutation": {"mirror": [1, 0]}, "signs": {"mirror": [-1, -1]}}],
        "action": [{"name": "tau", "size": 1, "matrix": {"mirror": [[-1]]}}],
    }
    table.update(override)
    return table


@pytest.mark.parametrize(
    "override, message",
    [
        ({"generators": []}, r"generators: expected a list of one or more names"),
        ({"generators": ["a", "a"]}, r"expected distinct names"),
        ({"groups": 1}, r"unknown keys \['groups'\]"),
        ({"order": 4}, r"order: declared 4, but the generators generate a group of order 2"),
        ({"action": []}, r"action: expected one or more \[\[action\]\] tables"),
        ({"observation": [{"name": "q", "size": 0}]}, r"observation\[0\]\.size: expected an integer >= 1"),
        (
            {"observation": [{"name": "q", "size": 2, "permutation": {"mirror": [0, 0]}}]},
            r"observation\[0\] \(q\)\.permutation\.mirror: expected a permutation of 0\.\.1",
        ),
        (
            {"observation": [{"name": "q", "size": 2, "signs": {"mirror": [1, 2]}}]},
            r"q\)\.signs\.mirror: expected each value \+1 or -1",
        ),
        (
            {"observation": [{"name": "q", "size": 2, "signs": {"mirror": [1]}}]},
            r"q\)\.signs\.mirror: expected a list of 2 integers",
        ),
        (
            {"observation": [{"name": "q", "size": 2, "signs": {"mirorr": [1, -1]}}]},
            r"q\)\.signs: unknown generators \['mirorr'\]",
        ),
        (
            {"action": [{"name": "tau", "size": 2, "matrix": {"mirror": [[1, 1], [0, 1]]}}]},
            r"tau\)\.matrix\.mirror: expected an orthogonal matrix",
        ),
        (
            {"action": [{"name": "tau", "size": 2, "matrix": {"mirror": [[1, 0]]}}]},
            r"tau\)\.matrix\.mirror: expected a 2 x 2 matrix",
        ),
        (
            {"action": [{"name": "tau", "size": 1, "matrix": {"mirror": [[1]]}, "signs": {"mirror": [1]}}]},
            r"tau\): give either matrix or permutation/signs",
        ),
        ({"action": [{"name": "tau", "size": 1, "gain": 2}]}, r"action\[0\]: unknown keys \['gain'\]"),
    ],
)
def test_bad_declarations_are_rejected_with_the_place(override, message):
    SymmetrySpec.from_dict(_spec())  # the base declaration is valid
    with pytest.raises(SymmetrySpecError, match=message):
        SymmetrySpec.from_dict(_spec(**override))


def test_unreadable_files(tmp_path):
    with pytest.raises(SymmetrySpecError, match="cannot read"):
        SymmetrySpec.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("generators = [")
    with pytest.raises(SymmetrySpecError, match="not valid TOML"):
        SymmetrySpec.load(bad)
