"""compare.py on synthetic result folders: exact improvements, paired tests, samples, plots, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_TIMEOUT_S

from dialogsum.comparison import (
    build_comparison,
    compare_runs,
    load_run,
    parse_run_spec,
    parse_run_specs,
    render_markdown,
)
from dialogsum.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compare.py"

DIALOGUES = {
    "d1": "#Person1#: Hello, how are you?\n#Person2#: Fine, thanks.",
    "d2": "#Person1#: Where is the station?\n#Person2#: Turn left.",
    "d3": "#Person1#: Is the cat in?\n#Person2#: It sat on the mat.",
    "d4": "#Person1#: Lunch?\n#Person2#: Sure, at noon.",
}
REFERENCES = {
    "d1": ["two friends greet each other"],
    "d2": ["someone asks the way to the station"],
    # Best match "a cat sat on a mat": R1 2/3, R2 2/5, RL 2/3 against "the cat sat on the mat".
    "d3": ["a cat sat on a mat", "the dog ran away"],
    "d4": ["they agree to have lunch at noon"],
}
CAT = "the cat sat on the mat"
MISS = "zzz"  # shares no token with any reference: every ROUGE score is 0

# Per-system predictions. original: one exact hit of four -> 0.25 on every metric.
PREDICTIONS = {
    "original": {"d1": REFERENCES["d1"][0], "d2": MISS, "d3": MISS, "d4": MISS},
    "full": {"d1": REFERENCES["d1"][0], "d2": REFERENCES["d2"][0], "d3": CAT, "d4": MISS},
    "lora": {"d1": REFERENCES["d1"][0], "d2": MISS, "d3": CAT, "d4": MISS},
}
# Expected multi-reference means (0..1), from the hand-computed pair scores above.
EXPECTED = {
    "original": {"rouge1": 1 / 4, "rouge2": 1 / 4, "rougeL": 1 / 4, "rougeLsum": 1 / 4},
    "full": {
        "rouge1": (2 + 2 / 3) / 4,
        "rouge2": (2 + 2 / 5) / 4,
        "rougeL": (2 + 2 / 3) / 4,
        "rougeLsum": (2 + 2 / 3) / 4,
    },
    "lora": {
        "rouge1": (1 + 2 / 3) / 4,
        "rouge2": (1 + 2 / 5) / 4,
        "rougeL": (1 + 2 / 3) / 4,
        "rougeLsum": (1 + 2 / 3) / 4,
    },
}
RESOURCES = {
    "original": {},
    "full": {
        "method": "full",
        "trainable_params": 247_577_856,
        "trainable_percent": 100.0,
        "checkpoint_size_mb": 990.2,
        "peak_memory_mb": 15_600.0,
        "train_runtime_s": 5400.0,
        "train_tokens_per_s": 1130.0,
    },
    "lora": {
        "method": "lora",
        "trainable_params": 3_538_944,
        "trainable_percent": 1.41,
        "checkpoint_size_mb": 14.2,
        "peak_memory_mb": 9000.0,
        "train_runtime_s": 3600.0,
        "train_tokens_per_s": 1800.0,
    },
}


def write_run(folder: Path, name: str, order: list[str] | None = None, metrics_extra: dict | None = None) -> Path:
    """A result folder as training/evaluate.py writes it (lines in ``order``, default d1..d4)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {**EXPECTED[name], "num_eval_examples": 4, **RESOURCES[name], **(metrics_extra or {})}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    lines = []
    for example_id in order or list(DIALOGUES):
        refs = REFERENCES[example_id]
        row = {
            "id": example_id,
            "dialogue": DIALOGUES[example_id],
            "reference": refs[0],
            "references": refs,
            "prediction": PREDICTIONS[name][example_id],
        }
        lines.append(json.dumps(row))
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def three_runs(tmp_path: Path) -> list[str]:
    return [
        f"original={write_run(tmp_path / 'original', 'original')}",
        # Line order must not matter.
        f"full={write_run(tmp_path / 'full', 'full', order=['d3', 'd1', 'd4', 'd2'])}",
        f"lora={write_run(tmp_path / 'lora', 'lora')}",
    ]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_TIMEOUT_S,
        check=False,
    )


def test_exact_scores_and_improvements(three_runs: list[str], tmp_path: Path) -> None:
    comparison = compare_runs(three_runs, tmp_path / "out", num_samples=2, seed=3, n_resamples=200)
    systems = {s["name"]: s for s in comparison["systems"]}
    assert comparison["baseline"] == "original" and comparison["num_examples"] == 4
    for name, expected in EXPECTED.items():
        for key, value in expected.items():
            assert systems[name]["rouge"][key]["mean"] == pytest.approx(value)
            low, high = systems[name]["rouge"][key]["ci_low"], systems[name]["rouge"][key]["ci_high"]
            assert low <= value <= high
    full = systems["full"]["improvement_over_baseline"]
    assert full["rouge1"]["points"] == pytest.approx(100 * (2 / 3 - 1 / 4))  # +41.67
    assert full["rouge1"]["relative_percent"] == pytest.approx(100 * (2 / 3 - 1 / 4) / (1 / 4))  # +166.7%
    assert full["rouge2"]["points"] == pytest.approx(35.0)
    assert full["rouge2"]["relative_percent"] == pytest.approx(140.0)
    assert systems["original"]["improvement_over_baseline"]["rouge1"]["points"] == 0.0
    # d3 has two references; the flat protocol scores both rows (5 references in all).
    assert systems["full"]["num_references"] == 5
    assert systems["full"]["protocols"]["flat"]["rouge1"] == pytest.approx((1 + 1 + 2 / 3 + 0.2 + 0) / 5)

    report = (tmp_path / "out" / "comparison.md").read_text()
    assert "| full | +41.67 (+166.7%) | +35.00 (+140.0%) | +41.67 (+166.7%) | +41.67 (+166.7%) |" in report
    assert "| lora | +16.67 (+66.7%) | +10.00 (+40.0%) | +16.67 (+66.7%) | +16.67 (+66.7%) |" in report
    assert "| original | 25.00 [" in report
    assert "![ROUGE per system](rouge.png)" in report and "![Resources per system](resources.png)" in report
    assert "| System | Method | Trainable parameters | Trainable % | Checkpoint size | Peak memory |" in report
    assert "| full | full | 247,577,856 | 100.00% | 990.2 MB | 15.60 GB | 1 h 30 min | 1,130 |" in report
    assert "| original | – | – | – | – | – | – | – |" in report
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert written == json.loads(json.dumps(comparison))
    for image in ("rouge.png", "resources.png"):
        assert (tmp_path / "out" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_paired_bootstrap_pairs_and_directions(three_runs: list[str], tmp_path: Path) -> None:
    comparison = compare_runs(three_runs, tmp_path / "out", num_samples=0, n_resamples=300)
    pairs = [(p["system"], p["versus"]) for p in comparison["paired_bootstrap"]]
    assert pairs == [("full", "original"), ("lora", "original"), ("lora", "full")]
    lora_vs_full = comparison["paired_bootstrap"][2]["tests"]["rouge1"]
    assert lora_vs_full["mean_difference"] == pytest.approx(-0.25)  # lora misses d2, full gets it right
    assert lora_vs_full["n"] == 4 and lora_vs_full["ci_low"] <= -0.25 <= lora_vs_full["ci_high"]
    assert comparison["samples"] == []


def test_samples_are_seeded_and_shown(three_runs: list[str], tmp_path: Path) -> None:
    runs = [load_run(*parse_run_spec(spec)) for spec in three_runs]
    first = build_comparison(runs, num_samples=2, seed=5, n_resamples=50)["samples"]
    again = build_comparison(runs, num_samples=2, seed=5, n_resamples=50)["samples"]
    assert [s["id"] for s in first] == [s["id"] for s in again]
    assert len({s["id"] for s in first}) == 2
    other_seeds = {tuple(s["id"] for s in build_comparison(runs, 2, seed, 10)["samples"]) for seed in range(8)}
    assert len(other_seeds) > 1
    sample = first[0]
    assert sample["predictions"] == {name: PREDICTIONS[name][sample["id"]] for name in PREDICTIONS}
    assert sample["references"] == REFERENCES[sample["id"]]
    assert len(build_comparison(runs, num_samples=10, seed=0, n_resamples=10)["samples"]) == 4
    report = render_markdown(build_comparison(runs, 2, 5, 50), {})
    assert DIALOGUES[sample["id"]].splitlines()[0] in report
    assert "![" not in report  # no plots given, none referenced


def test_script_end_to_end(three_runs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run_script(*(f"--run={spec}" for spec in three_runs), "--output_dir", str(out), "--num_samples", "1")
    assert result.returncode == 0, result.stderr
    assert "full" in result.stdout and "66.67" in result.stdout  # full's ROUGE-1 x 100 in the terminal table
    assert "Sample 1:" in result.stdout and "HUMAN" in result.stdout and "LORA" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.json",
        "comparison.md",
        "resources.png",
        "rouge.png",
    ]


def test_runs_without_resources_skip_the_resource_section(tmp_path: Path) -> None:
    specs = [f"a={write_run(tmp_path / 'a', 'original')}", f"b={write_run(tmp_path / 'b', 'lora')}"]
    for spec in specs:  # drop the resource keys
        folder = Path(spec.split("=", 1)[1])
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if "rouge" in k}))
    compare_runs(specs, tmp_path / "out", num_samples=1, n_resamples=20)
    assert not (tmp_path / "out" / "resources.png").exists()
    assert "## Resources" not in (tmp_path / "out" / "comparison.md").read_text()


def test_parse_run_specs() -> None:
    assert parse_run_spec("full=out/full") == ("full", Path("out/full"))
    assert parse_run_spec("a=b=c") == ("a", Path("b=c"))
    for bad in ("outputs/full", "=dir", "name=", "bad name=dir"):
        with pytest.raises(ConfigError):
            parse_run_spec(bad)
    with pytest.raises(ConfigError, match="given twice"):
        parse_run_specs(["a=x", "a=y"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_run_specs([])


def _mismatched(tmp_path: Path) -> list[str]:
    base = write_run(tmp_path / "base", "original")
    other = write_run(tmp_path / "other", "full")
    lines = (other / "predictions.jsonl").read_text().splitlines()
    (other / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n")
    return [f"original={base}", f"full={other}"]


def _changed_dialogue(tmp_path: Path) -> list[str]:
    base = write_run(tmp_path / "base", "original")
    other = write_run(tmp_path / "other", "full")
    path = other / "predictions.jsonl"
    path.write_text(path.read_text().replace("Turn left.", "Turn right."))
    return [f"original={base}", f"full={other}"]


def _fewer_references(tmp_path: Path) -> list[str]:
    """The same predictions scored against three references per dialogue and against the first one only."""
    three = write_run(tmp_path / "three", "full")
    one = write_run(tmp_path / "one", "full")
    for folder, count in ((three, 3), (one, 1)):
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        for row in rows:
            row["references"] = [row["reference"], "they talk", "a short talk between two people"][:count]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"three={three}", f"one={one}"]


def _no_metrics(tmp_path: Path) -> list[str]:
    folder = write_run(tmp_path / "a", "original")
    (folder / "metrics.json").unlink()
    return [f"a={folder}"]


def _bad_json(tmp_path: Path) -> list[str]:
    folder = write_run(tmp_path / "a", "original")
    (folder / "metrics.json").write_text('{"rouge1": 0.2,')
    return [f"a={folder}"]


def _bad_predictions_line(tmp_path: Path) -> list[str]:
    folder = write_run(tmp_path / "a", "original")
    with (folder / "predictions.jsonl").open("a") as stream:
        stream.write("{not json\n")
    return [f"a={folder}"]


def _empty_references(tmp_path: Path) -> list[str]:
    folder = write_run(tmp_path / "a", "original")
    row = {"id": "x", "dialogue": "hi", "references": [], "prediction": "hello"}
    (folder / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    return [f"a={folder}"]


def _duplicate_names(tmp_path: Path) -> list[str]:
    folder = write_run(tmp_path / "a", "original")
    return [f"a={folder}", f"a={folder}"]


def _missing_folder(tmp_path: Path) -> list[str]:
    return [f"a={tmp_path / 'nowhere'}"]


def _no_equals(tmp_path: Path) -> list[str]:
    return [str(write_run(tmp_path / "a", "original"))]


BAD_INPUTS = [
    (_no_metrics, "no metrics.json in", 1),
    (_bad_json, "metrics.json is not valid JSON", 1),
    (_bad_predictions_line, "line 5 is not valid JSON", 1),
    (_empty_references, "'references' must be a non-empty list", 1),
    (_mismatched, "were evaluated on different dialogues (1 only in original, 0 only in full", 1),
    (_changed_dialogue, "different dialogue texts for id 'd2'", 1),
    (_fewer_references, "the references of id 'd1' differ, 3 in three, 1 in one); their ROUGE is not comparable", 1),
    (_duplicate_names, "--run name 'a' is given twice", 2),
    (_missing_folder, "result folder not found", 1),
    (_no_equals, "--run expects NAME=DIR", 2),
]


@pytest.mark.parametrize(("make_specs", "message", "code"), BAD_INPUTS)
def test_bad_input_raises_before_writing(tmp_path: Path, make_specs, message: str, code: int) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError) as error:
        compare_runs(make_specs(tmp_path), out, num_samples=1, n_resamples=10)
    assert message in str(error.value) and error.value.exit_code == code
    assert not out.exists()


@pytest.mark.parametrize(("make_specs", "message", "code"), [BAD_INPUTS[i] for i in (0, 4, 9)])
def test_script_bad_input_is_one_line(tmp_path: Path, make_specs, message: str, code: int) -> None:
    out = tmp_path / "out"
    result = run_script(*(f"--run={spec}" for spec in make_specs(tmp_path)), "--output_dir", str(out))
    assert result.returncode == code
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_failed_comparison_keeps_the_previous_report(three_runs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    compare_runs(three_runs, out, num_samples=1, n_resamples=20)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="different dialogues"):
        compare_runs(_mismatched(tmp_path / "bad"), out, num_samples=1, n_resamples=20)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_dir_that_is_a_file(three_runs: list[str], tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        compare_runs(three_runs, target, num_samples=0, n_resamples=10)
