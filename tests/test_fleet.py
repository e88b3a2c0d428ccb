"""Fleet scans (`clipguard scan MODEL... | DIR --out OUT`, `clipguard.fleet.scan_fleet`): one
report folder per model and OUT/summary.jsonl; failures are rows, reruns resume, and local
processes and Ray give the verdicts one process gives."""

from __future__ import annotations

import inspect
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from clipguard import api, fleet, runtime
from clipguard.errors import InputError
from clipguard.fleet import FleetRow, fleet_exit_code, model_names, scan_fleet
from clipguard.io import safetensors_bytes
from clipguard.model import build_clip_from_config, save_model
from tests.conftest import TINY_CONFIG
from tests.core.cli_helpers import assert_one_line_error, run_cli
from tests.test_cli_fast import _probe

#: cbpt options that keep a scan of a tiny model under a second
SMALL = {
    "refine_batch_size": 4,
    "inversion_window": 1,
    "refine_steps": 2,
    "class_steps": 2,
    "budget": 200,
}
SMALL_ARGS = [
    "--shots", "2", "--draws", "1",
    *[part for key, value in SMALL.items() for part in ("-o", f"{key}={value}")],
]  # fmt: skip
SMALL_KWARGS = {"shots": 2, "draws": 1, "options": SMALL}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two distinct tiny models (seeds 0 and 1)."""
    folder = tmp_path_factory.mktemp("fleet-models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = folder / f"tiny{seed}.safetensors"
        save_model(path, build_clip_from_config(TINY_CONFIG), TINY_CONFIG)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture
def registry(tmp_path: Path, two_models: tuple[Path, Path]) -> Path:
    """A model folder as a registry holds one: two models (one in a sub-folder), a broken
    checkpoint, and what is not a model: a lab model card, a trigger file beside the model
    (as `clipguard lab build --attack badclip-like` writes), a hidden folder's model."""
    root = tmp_path / "registry"
    (root / "vendor b").mkdir(parents=True)
    (root / ".cache").mkdir()
    shutil.copy(two_models[0], root / "alpha.safetensors")
    shutil.copy(two_models[1], root / "vendor b" / "beta.safetensors")
    shutil.copy(two_models[0], root / ".cache" / "hidden.safetensors")
    (root / "broken.pt").write_bytes(two_models[0].read_bytes()[:1000])
    (root / "alpha.card.json").write_text("{}\n")
    trigger = safetensors_bytes({"mask": torch.zeros(2)}, {"format": "clipguard.trigger/1"})
    (root / "alpha.badclip-patch.safetensors").write_bytes(trigger)
    return root


def _summary(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def test_a_folder_is_searched_and_a_broken_checkpoint_is_one_row(registry, tiny_data, tmp_path):
    out = tmp_path / "audits"
    result = run_cli(
        "scan", registry, "--data", tiny_data, "--out", out, "--format", "md", "--json",
        *SMALL_ARGS,
    )  # fmt: skip
    assert result.exit_code == 2, result.output  # a model failed: the audit is incomplete
    rows = _summary(out)
    assert [row["name"] for row in rows] == ["alpha", "broken", "vendor_b__beta"]
    assert [Path(row["path"]).name for row in rows] == [
        "alpha.safetensors",
        "broken.pt",
        "beta.safetensors",
    ]
    assert [json.loads(line) for line in result.stdout.splitlines()] == rows
    alpha, broken, beta = rows
    assert set(alpha) == {
        "path", "name", "sha256", "verdict", "target", "score", "seconds", "error", "report",
        "reused",
    }  # fmt: skip
    for row in (alpha, beta):
        assert row["error"] is None and row["verdict"] in ("backdoor", "clean", "inconclusive")
        assert row["report"] == f"{row['name']}/report.json" and not row["reused"]
        report = api.Report.model_validate_json((out / row["report"]).read_text())
        assert (report.verdict, report.target_class) == (row["verdict"], row["target"])
        assert report.model.sha256 == row["sha256"] and row["seconds"] > 0
        assert (out / row["name"] / "report.md").is_file()
        assert (out / row["name"] / "fleet.json").is_file()
    assert alpha["sha256"] != beta["sha256"]
    assert broken["verdict"] is None and broken["report"] is None
    assert "truncated" in broken["error"] and "\n" not in broken["error"]
    assert not (out / "broken" / "fleet.json").exists()
    assert "3 models" in result.stderr and "summary.jsonl" in result.stderr


def test_several_model_files_and_exit_codes_follow_fail_on(two_models, tiny_data, tmp_path):
    out = tmp_path / "audits"
    first = run_cli("scan", *two_models, "--data", tiny_data, "--out", out, "-q", *SMALL_ARGS)
    rows = _summary(out)
    assert [row["name"] for row in rows] == ["tiny0", "tiny1"]
    verdicts = [row["verdict"] for row in rows]
    failing = ["backdoor", "inconclusive"]
    assert first.exit_code == fleet_exit_code([FleetRow(**row) for row in rows], failing)
    assert first.stderr == ""  # -q: no table
    again = run_cli(
        "scan", *two_models, "--data", tiny_data, "--out", out, "-q", "--fail-on", "none",
        *SMALL_ARGS,
    )  # fmt: skip
    assert again.exit_code == 0
    assert [row["verdict"] for row in _summary(out)] == verdicts


def _row(verdict: str | None = None, error: str | None = None) -> FleetRow:
    return FleetRow(
        path="m.pt", name="m", sha256=None, verdict=verdict, target=None, score=None,
        seconds=0.0, error=error, report=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "fail_on", "code"),
    [
        ([_row("clean"), _row("clean")], ["backdoor", "inconclusive"], 0),
        ([_row("clean"), _row("inconclusive")], ["backdoor", "inconclusive"], 3),
        ([_row("inconclusive"), _row("backdoor")], ["backdoor", "inconclusive"], 1),
        ([_row("backdoor"), _row(error="bad")], ["backdoor", "inconclusive"], 2),
        ([_row("clean"), _row(error="bad")], [], 2),
        ([_row("inconclusive"), _row("backdoor")], ["inconclusive"], 3),
        ([_row("inconclusive"), _row("backdoor")], ["backdoor"], 1),
        ([_row("inconclusive"), _row("backdoor")], [], 0),
    ],
)
def test_the_exit_code_is_the_worst_row(rows, fail_on, code):
    assert fleet_exit_code(rows, fail_on) == code


@pytest.fixture
def scanned_folder(two_models, tiny_data, tmp_path) -> tuple[Path, Path, list[FleetRow]]:
    """A folder with copies of the two models, scanned once as a fleet into ``audits``: the
    folder, the output folder and the rows."""
    models = tmp_path / "models"
    models.mkdir()
    for path in two_models:
        shutil.copy(path, models / path.name)
    out = tmp_path / "audits"
    return models, out, scan_fleet([models], tiny_data, out, **SMALL_KWARGS)


def test_a_rerun_reuses_finished_models_and_rescans_what_changed(
    scanned_folder, two_models, tiny_data
):
    models, out, first = scanned_folder
    report = out / "tiny0" / "report.json"
    written = report.stat().st_mtime_ns
    again = scan_fleet([models], tiny_data, out, formats=["html"], **SMALL_KWARGS)
    assert [row.reused for row in again] == [True, True]
    assert [row.model_copy(update={"reused": False}) for row in again] == first
    assert report.stat().st_mtime_ns == written
    assert (out / "tiny0" / "report.html").is_file()  # a format asked for later is rendered
    assert [FleetRow.model_validate(row) for row in _summary(out)] == again
    record = json.loads((out / "tiny0" / "fleet.json").read_text())
    assert record["sha256"] == first[0].sha256 and record["options"]["seed"] == 0
    # another seed: every model again; another model file: that model again
    reseeded = scan_fleet([models], tiny_data, out, seed=1, **SMALL_KWARGS)
    assert [row.reused for row in reseeded] == [False, False]
    shutil.copy(two_models[0], models / "tiny1.safetensors")
    changed = scan_fleet([models], tiny_data, out, seed=1, **SMALL_KWARGS)
    assert [row.reused for row in changed] == [True, False]
    assert changed[1].sha256 == changed[0].sha256


def test_a_rerun_starts_workers_only_for_what_is_left(
    scanned_folder, two_models, tiny_data, monkeypatch
):
    models, out, first = scanned_folder
    sent: list[list[str]] = []

    def no_worker(jobs, *args):
        sent.append([job.name for _, job in jobs])
        return fleet._run_in_process(jobs, fleet.Progress(quiet=True), args[-1])

    monkeypatch.setattr(fleet, "_run_processes", no_worker)
    monkeypatch.setattr(fleet, "_run_ray", no_worker)
    for executor in ("local", "ray"):
        again = scan_fleet([models], tiny_data, out, jobs=2, executor=executor, **SMALL_KWARGS)
        assert [row.reused for row in again] == [True, True]
        assert [row.verdict for row in again] == [row.verdict for row in first]
    assert sent == []  # nothing left to scan: neither processes nor Ray were started
    shutil.copy(two_models[0], models / "tiny1.safetensors")
    changed = scan_fleet([models], tiny_data, out, jobs=2, **SMALL_KWARGS)
    assert sent == [["tiny1"]] and [row.reused for row in changed] == [True, False]
    assert [row["name"] for row in _summary(out)] == ["tiny0", "tiny1"]


def test_an_interrupted_run_leaves_a_valid_summary(two_models, tiny_data, tmp_path, monkeypatch):
    real = fleet.run_model

    def interrupted(job):
        if job.name == "tiny1":
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(fleet, "run_model", interrupted)
    out = tmp_path / "audits"
    with pytest.raises(KeyboardInterrupt):
        scan_fleet(list(two_models), tiny_data, out, **SMALL_KWARGS)
    assert [row["name"] for row in _summary(out)] == ["tiny0"]


def test_an_unexpected_failure_is_an_internal_error_row(
    two_models, tiny_data, tmp_path, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "scan", broken)
    rows = scan_fleet(list(two_models), tiny_data, tmp_path / "audits", **SMALL_KWARGS)
    assert [row.error for row in rows] == ["internal error: RuntimeError: boom"] * 2
    assert all(row.sha256 and row.verdict is None for row in rows)


def test_local_processes_give_the_verdicts_of_one_process(two_models, tiny_data, tmp_path):
    one = scan_fleet(list(two_models), tiny_data, tmp_path / "j1", threads=1, **SMALL_KWARGS)
    two = scan_fleet(
        list(two_models), tiny_data, tmp_path / "j2", jobs=2, threads=1, **SMALL_KWARGS
    )
    assert [(r.name, r.verdict, r.target, r.sha256) for r in two] == [
        (r.name, r.verdict, r.target, r.sha256) for r in one
    ]
    assert [r.score for r in two] == pytest.approx([r.score for r in one])
    assert all(row.error is None for row in two)


def test_a_ray_address_where_nothing_answers_is_one_line_at_once(two_models, tiny_data, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install clipguard[ray])")
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(
        "scan", *two_models, "--data", tiny_data, "--out", tmp_path / "o", "--executor", "ray",
        "--ray-address", f"127.0.0.1:{port}", *SMALL_ARGS,
    )  # fmt: skip
    assert_one_line_error(result, f"Ray cluster at 127.0.0.1:{port}", "nothing answers")


def test_ray_unreachable_tells_a_listening_address_from_a_dead_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert fleet.ray_unreachable(f"127.0.0.1:{port}") is None
        assert fleet.ray_unreachable(f"ray://127.0.0.1:{port}") is None
    dead = fleet.ray_unreachable(f"127.0.0.1:{port}", timeout=2)
    assert dead is not None and dead.startswith(f"nothing answers at 127.0.0.1:{port} (")
    for resolved_by_ray in ("auto", "local", "localhost"):
        assert fleet.ray_unreachable(resolved_by_ray) is None


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install clipguard[ray])")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_gives_the_verdicts_of_one_process(local_ray, two_models, tiny_data, tmp_path):
    one = scan_fleet(list(two_models), tiny_data, tmp_path / "local", threads=1, **SMALL_KWARGS)
    result = run_cli(
        "scan", *two_models, "--data", tiny_data, "--out", tmp_path / "ray", "--executor", "ray",
        "--threads", "1", "-q", "--fail-on", "none", *SMALL_ARGS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [FleetRow.model_validate(row) for row in _summary(tmp_path / "ray")]
    assert [(r.name, r.verdict, r.target, r.sha256, r.error) for r in rows] == [
        (r.name, r.verdict, r.target, r.sha256, None) for r in one
    ]
    assert [row.path for row in rows] == [str(path) for path in two_models]


def test_without_ray_the_ray_executor_is_one_line(two_models, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = run_cli(
        "scan", *two_models, "--data", tiny_data, "--out", tmp_path / "o", "--executor", "ray"
    )
    assert_one_line_error(result, "pip install clipguard[ray]")
    assert not (tmp_path / "o").exists()


def test_a_single_model_file_is_scanned_as_before(tiny_model_path, tiny_data, tmp_path):
    out = tmp_path / "audit"
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--out", out, "--json", "--jobs", "2",
        *SMALL_ARGS,
    )  # fmt: skip
    report = api.Report.model_validate_json(result.stdout)
    assert result.exit_code == {"clean": 0, "backdoor": 1, "inconclusive": 3}[report.verdict]
    assert (out / "report.json").is_file()
    assert not (out / "summary.jsonl").exists() and not (out / "fleet.json").exists()


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ([], ["needs --out"]),
        (["--out", "OUT", "--estimate"], ["--estimate takes one model"]),
        (["--out", "OUT", "--ray-address", "h:6379"], ["--ray-address needs --executor ray"]),
        (["--out", "OUT", "--executor", "dask"], ["--executor 'dask'"]),
        (["--out", "OUT", "--plugin", "nope"], ["unknown scanner 'nope'"]),
    ],
)
def test_fleet_errors_are_one_line_before_any_work(
    two_models, tiny_data, tmp_path, extra, fragments
):
    extra = [str(tmp_path / "out") if part == "OUT" else part for part in extra]
    result = run_cli("scan", *two_models, "--data", tiny_data, *extra)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_paths_and_empty_folders_are_one_line(two_models, tiny_data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no models here\n")
    (empty / ".hidden").mkdir()
    shutil.copy(two_models[0], empty / ".hidden" / "m.safetensors")
    out = tmp_path / "out"
    result = run_cli("scan", empty, "--data", tiny_data, "--out", out)
    assert_one_line_error(result, str(empty), "no checkpoints found")
    result = run_cli("scan", two_models[0], tmp_path / "gone.pt", "--data", tiny_data, "--out", out)
    assert_one_line_error(result, "gone.pt", "not found")
    result = run_cli("scan", *two_models, "--data", tmp_path / "nodata", "--out", out)
    assert_one_line_error(result, "data folder not found")
    taken = tmp_path / "taken"
    (taken / "tiny0" / "report.json").mkdir(parents=True)
    result = run_cli("scan", *two_models, "--data", tiny_data, "--out", taken)
    assert_one_line_error(result, "report.json", "is a folder")
    assert not out.exists()


def test_fleet_errors_come_before_torch(two_models, tiny_data, tmp_path):
    probe = _probe(
        ["scan", str(two_models[0]), str(two_models[1]), "--data", str(tiny_data)],
        ["scan", str(tmp_path), "--data", str(tiny_data), "--out", str(tmp_path / "o")],
    )
    assert probe == {"first_heavy": None, "codes": [2, 2]}


def test_repeats_are_scanned_once_and_the_output_folder_is_not_searched(two_models, tmp_path):
    models, root = fleet.find_models([two_models[0], two_models[0].parent, two_models[1]])
    assert models == list(two_models) and root == two_models[0].parent
    (tmp_path / "audits" / "old").mkdir(parents=True)
    shutil.copy(two_models[0], tmp_path / "model.pt")
    shutil.copy(two_models[0], tmp_path / "audits" / "old" / "copy.pt")
    models, root = fleet.find_models([tmp_path], skip=tmp_path / "audits")
    assert models == [tmp_path / "model.pt"] and root == tmp_path


def test_model_names_are_unique_safe_and_deterministic(tmp_path):
    relative = [
        "a/m.pt",
        "a/m.safetensors",
        "b/M.bin",
        "c d/é.pth",
        ".x.pt",
        "summary.jsonl.pt",
        "deep/" * 30 + "long.bin",
        "plain.ckpt",
    ]
    paths = [tmp_path / name for name in relative]
    names = model_names(paths, tmp_path)
    assert model_names(list(reversed(paths)), tmp_path) == list(reversed(names))
    assert len({name.casefold() for name in names}) == len(names)
    assert all(
        len(name) <= fleet.MAX_NAME and not name.startswith(".") and "/" not in name
        for name in names
    )
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
               for name in names)  # fmt: skip
    assert names[0].startswith("a__m-") and names[1].startswith("a__m-") and names[0] != names[1]
    assert names[2] == "b__M" and names[3] == "c_d___" and names[4] == "_x"
    assert names[5].startswith("summary.jsonl-") and names[7] == "plain"


def test_sidecars_are_told_apart_from_models(two_models, tmp_path):
    trigger = tmp_path / "trigger.safetensors"
    trigger.write_bytes(safetensors_bytes({"x": torch.zeros(1)}, {"format": "clipguard.trigger/1"}))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 20)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(safetensors_bytes({"x": torch.zeros(1)}, {"format": "pt"}))
    assert fleet.is_sidecar(trigger)
    assert not any(fleet.is_sidecar(path) for path in (two_models[0], corrupt, foreign))


def test_scan_settings_default_as_the_api_does():
    assert fleet.DEFAULT_MAX_THREADS == runtime.CLI_DEFAULT_MAX_THREADS
    parameters = inspect.signature(api.scan).parameters
    for name, field in fleet.ScanSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        expected = parameters[name].default
        assert default == ({} if name == "options" else expected), name
    with pytest.raises(TypeError, match="out_dir"):
        scan_fleet([], ".", ".", out_dir="x")


def test_the_api_checks_before_any_work(two_models, tiny_data, tmp_path):
    with pytest.raises(InputError, match="--jobs must be at least 1"):
        scan_fleet(list(two_models), tiny_data, tmp_path / "o", jobs=0)
    with pytest.raises(InputError, match="--draws must be at least 1"):
        scan_fleet(list(two_models), tiny_data, tmp_path / "o", draws=0)
    assert not (tmp_path / "o").exists()


def test_ray_tasks_get_absolute_paths(two_models, tiny_data, tmp_path, monkeypatch):
    shutil.copytree(two_models[0].parent, tmp_path / "models")
    assert tiny_data == tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    settings = fleet.ScanSettings(classnames_file=None, **SMALL_KWARGS)
    plan = fleet.plan_fleet(["models"], "data", "audits", settings, sarif_base=Path("."))
    job = plan.job(plan.models[0], threads=1, quiet=True).absolute()
    assert job.path == str(Path("models") / "tiny0.safetensors")
    for path in (job.model, job.out_dir, job.data_dir, job.sarif_base):
        assert path.is_absolute() and path.is_relative_to(tmp_path)
    assert job.out_dir == tmp_path / "audits" / "tiny0"
