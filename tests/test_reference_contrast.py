"""Reference contrast of reach probes: a suspect's reach above a trusted model's, per class
and bound, read from probe_reach lines."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.reference_contrast import ProbeLine, contrast, main, mean_line, read_lines

CLASSES = ["cat", "dog", "frog"]
REACH = st.lists(st.floats(0, 1), min_size=3, max_size=3)


def _line(model: str, reach: list[float], sweep: dict[str, list[float]], target=None) -> str:
    return json.dumps(
        {
            "model": model,
            "attack": "none" if target is None else "bpp",
            "target": target,
            "settings": {"epsilon": 0.02},
            "reach": dict(zip(CLASSES, reach, strict=True)),
            "sweep": sweep,
        }
    )


def test_the_contrast_is_the_largest_reach_above_the_reference_at_a_shared_bound(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_text(
        "\n".join(
            [
                _line("ref", [0.1, 0.2, 0.3], {"2": [0.4, 0.5, 0.6]}),
                # at 0.5 x the bound only the suspect was probed: that bound does not count
                _line(
                    "sus", [0.1, 0.2, 0.3], {"0.5": [0.9, 0.9, 0.9], "2": [0.4, 0.9, 0.6]}, "dog"
                ),
            ]
        )
    )
    lines = read_lines([path])
    assert sorted(lines["sus"].reach) == [0.01, 0.02, 0.04]
    result = contrast(lines["sus"], lines["ref"])
    assert (result.suspect, result.bound, result.target_value) == ("dog", 0.04, 0.4)
    assert result.value == pytest.approx(0.4)


def test_colour_lines_are_read_at_their_strength(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    line = json.loads(_line("c", [0.1, 0.2, 0.3], {"2": [0.4, 0.5, 0.6]}))
    line.update(probe="colour", settings={"strength": 0.1})
    path.write_text(json.dumps(line))
    assert sorted(read_lines([path])["c"].reach) == [0.1, 0.2]


@given(REACH, REACH)
def test_a_model_contrasted_with_itself_is_zero_and_contrast_is_antisymmetric_at_its_max(
    a: list[float], b: list[float]
) -> None:
    lines = read_lines_from([_line("a", a, {}), _line("b", b, {})])
    assert contrast(lines["a"], lines["a"]).value == 0
    forward, backward = contrast(lines["a"], lines["b"]), contrast(lines["b"], lines["a"])
    assert forward.value == pytest.approx(max(x - y for x, y in zip(a, b, strict=True)), abs=1e-3)
    assert backward.value >= -forward.value - 1e-3


def read_lines_from(texts: list[str]) -> dict[str, ProbeLine]:
    """The lines of ``texts`` as :func:`read_lines` reads them from a file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lines.jsonl"
        path.write_text("\n".join(texts))
        return read_lines([path])


def test_a_clean_fit_threshold_fits_no_backdoored_model_and_judges_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        "\n".join(
            [
                _line("clean-s0", [0.1, 0.1, 0.1], {}),
                _line("clean-s1", [0.15, 0.1, 0.1], {}),
                _line("clean-s2", [0.1, 0.12, 0.1], {}),
                _line("bpp-s0", [0.1, 0.4, 0.1], {}, target="dog"),
                _line("bpp-s1", [0.3, 0.1, 0.1], {}, target="frog"),
                _line("bpp-s2", [0.12, 0.1, 0.1], {}, target="frog"),
            ]
        )
    )
    out = tmp_path / "out.json"
    argv = ["reference_contrast", str(lines), "--reference", "clean-s0", "--clean-fit"]
    monkeypatch.setattr("sys.argv", [*argv, "--pairs", "clean-s[01]", "--out", str(out)])
    main()
    table = capsys.readouterr().out
    # the threshold is the larger contrast of the one clean pair (0.05), not a family's
    written = json.loads(out.read_text())
    assert written["threshold"] == 0.05
    judged = {row["model"]: row["judged"] for row in written["rows"]}
    assert judged == {
        "clean-s1": "fit",
        "clean-s2": "clean",
        "bpp-s0": "yes, right",
        "bpp-s1": "yes, wrong",
        "bpp-s2": "no",
    }
    assert "| clean-s1 | - | 0.050 | cat (0.02) | - | fit |" in table
    assert "| clean-s2 | - | 0.020 | dog (0.02) | - | clean |" in table
    assert "| bpp-s0 | dog | 0.300 | dog (0.02) | 0.300 | yes, right |" in table
    assert "| bpp-s1 | frog | 0.200 | cat (0.02) | 0.000 | yes, wrong |" in table
    assert "| bpp-s2 | frog | 0.020 | cat (0.02) | 0.000 | no |" in table


def test_a_fixed_threshold_holds_every_model_out_of_the_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        "\n".join(
            [
                _line("clean-s0", [0.1, 0.1, 0.1], {}),
                _line("clean-s1", [0.3, 0.1, 0.1], {}),
                _line("bpp-s0", [0.1, 0.4, 0.1], {}, target="dog"),
                _line("bpp-s1", [0.15, 0.1, 0.1], {}, target="cat"),
            ]
        )
    )
    out = tmp_path / "out.json"
    argv = ["reference_contrast", str(lines), "--reference", "clean-s0", "--threshold", "0.1"]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(out)])
    main()
    written = json.loads(out.read_text())
    assert (written["threshold"], written["fixed_threshold"]) == (0.1, 0.1)
    judged = {row["model"]: row["judged"] for row in written["rows"]}
    assert judged == {"clean-s1": "false alarm", "bpp-s0": "yes, right", "bpp-s1": "no"}
    monkeypatch.setattr("sys.argv", [*argv, "--clean-fit"])
    with pytest.raises(SystemExit):
        main()


def test_several_references_are_contrasted_through_their_mean_reach(tmp_path: Path) -> None:
    lines_file = tmp_path / "lines.jsonl"
    lines_file.write_text(
        "\n".join(
            [
                _line("clean-a", [0.1, 0.2, 0.3], {"2": [0.2, 0.2, 0.2]}),
                _line("clean-b", [0.3, 0.2, 0.1], {"2": [0.4, 0.4, 0.4]}),
                _line("clean-c", [0.2, 0.2, 0.2], {"2": [0.3, 0.3, 0.3]}),
                _line("sus", [0.2, 0.6, 0.2], {"2": [0.3, 0.3, 0.3]}, "dog"),
            ]
        )
    )
    lines = read_lines([lines_file])
    mean = mean_line([lines["clean-a"], lines["clean-b"]])
    assert mean.model == "clean-a+clean-b"
    assert mean.reach[0.02] == pytest.approx([0.2, 0.2, 0.2])
    assert mean.reach[0.04] == pytest.approx([0.3, 0.3, 0.3])
    assert mean_line([lines["clean-c"]]) == lines["clean-c"]
    out = tmp_path / "out.json"
    argv = ["reference_contrast", str(lines_file), "--reference", "clean-a"]
    argv += ["--reference", "clean-b", "--clean-fit", "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", argv)
        main()
    result = json.loads(out.read_text())
    assert result["reference"] == "clean-a+clean-b"
    # every clean suspect against every pair of the other clean models: 3 of them
    assert len(result["clean_pairs"]) == 3
    (row,) = [r for r in result["rows"] if r["model"] == "sus"]
    assert (row["suspect"], row["value"]) == ("dog", pytest.approx(0.4))
    assert {r["model"] for r in result["rows"]} == {"clean-c", "sus"}
