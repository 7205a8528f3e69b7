"""README.md says only what ran (issue 21): every command it shows and every claim it makes is exercised
by a test of this suite or a recorded run, or the README marks it "not verified".

COMMANDS and CLAIMS map each command (its first words) and each claim (a phrase of its sentence) to the
evidence: a test function `path::name`, a file `path`, or a file holding a text `path: text`; each is
checked to exist. The tests list what README.md holds that nothing maps or marks; the lists must be empty.
"""

import dataclasses
import re
import subprocess
import typing
from pathlib import Path

import pytest

from keye_train.config.schema import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NOT_VERIFIED = "not verified"
FRESH_CLONES = "docs/perf.md: Clean clones of main, `bash .ci/run` (fresh `.venv`, then `make test`)"
CURRICULUM = "tests/e2e/test_curriculum.py::test_merge_is_the_average_and_export_keeps_the_logits"

# The first words of each command README.md shows -> what runs it.
COMMANDS = {
    "make demo": [CURRICULUM, "docs/perf.md: keye-demo --out /tmp/h21-demo"],
    "make test": [FRESH_CLONES],
    "keye-train recipe=": ["tests/e2e/test_curriculum.py::test_losses_decrease_within_each_stage"],
    "launch/torchrun.sh": [
        "tests/e2e/test_resume.py::test_preempted_runs_come_back_with_the_identical_command"
    ],
    "sbatch launch/slurm.sbatch": [
        "tests/unit/test_launch_scripts.py::test_slurm_usr1_is_forwarded_and_the_job_requeued"
    ],
    "launch/curriculum.sh": ["tests/unit/test_launch_scripts.py::test_curriculum_dry_run_chains_stages"],
    "keye-data synth": ["tests/unit/test_cli_data.py::test_synth_writes_shards_manifest_tokenizer"],
    "keye-data index": ["tests/unit/test_index.py::test_cli_index_with_workers"],
    "keye-data inspect ": ["tests/unit/test_cli_data.py::test_inspect_json"],
    "keye-data inspect-video": ["tests/unit/test_cli_data.py::test_inspect_video"],
    "keye-data calibrate": [
        "tests/unit/test_cost_prediction.py::test_calibrate_cli_times_the_tiny_model",
        "tests/unit/test_calibrate_warnings.py::test_a_degenerate_fit_is_reported",
    ],
    "keye-report": ["tests/unit/test_report.py::test_report_renders_a_png_comparing_runs"],
    "keye-ioserver": ["tests/unit/test_ioserver.py::test_server_results_equal_local_decoding"],
    "keye-convert init": ["tests/unit/test_convert.py::test_cli_as_subprocess_bf16"],
    "keye-convert inspect": ["tests/unit/test_convert.py::test_inspect_reports_kind_count_and_dtype"],
    "keye-convert export": ["tests/unit/test_export_merge.py::test_keye_convert_export_and_import"],
    "keye-convert import": ["tests/unit/test_export_merge.py::test_keye_convert_export_and_import"],
    "keye-merge --config": ["tests/unit/test_export_merge.py::test_keye_merge_cli_with_yaml_and_flags"],
    "keye-estimate": ["tests/unit/test_accounting.py::test_estimate_cli_prints_both_layouts"],
}

# A phrase of each claim sentence of README.md's prose -> what shows it.
CLAIMS = {
    "Distributed pre-training of Keye-VL-1.5-style": [
        "tests/parity/test_model_parity.py::test_language_logits_match_qwen3",
        "tests/parity/test_model_parity.py::test_vision_tower_without_rope_matches_siglip_at_384",
        "tests/e2e/test_curriculum.py::test_losses_decrease_within_each_stage",
    ],
    "Both work on a fresh machine": [FRESH_CLONES],
    "(which both call) installs everything else": [FRESH_CLONES],
    "lists the other targets": ["tests/unit/test_docs_claims.py::test_make_help_lists_the_targets"],
    "writes synthetic shards (real JPEG/PNG/MP4": [
        CURRICULUM,
        "tests/e2e/test_curriculum.py::test_stage3_runs_with_the_reset_rope_base_and_its_length",
        "tests/e2e/test_curriculum.py::test_stage1_trains_only_the_projector",
    ],
    "Everything lands in `demo_out/`": ["docs/perf.md: keye-demo --out /tmp/h21-demo"],
    "a mistyped key fails with its name": [
        "tests/unit/test_recipes.py::test_a_mistyped_key_fails_with_its_name"
    ],
    "Every knob is described": ["tests/unit/test_docs_claims.py::test_every_recipe_key_is_in_docs_recipes"],
    "DP with ZeRO 1/2/3 (FSDP2)": [
        "tests/distributed/test_dp_zero.py::test_dp2_zero_stages_match_single_process_accumulation",
        "tests/distributed/test_tp.py::test_tp2_matches_single_process_with_and_without_sequence_parallel",
        "tests/distributed/test_cp.py::test_ulysses_cp2_dp2_cp2_and_tp2_cp2_match_single_process",
        "tests/distributed/test_pp.py::test_pp2_schedules_match_single_process",
        "tests/distributed/test_pp.py::test_pp2_with_tp2_cp2_or_fsdp_dp2_matches_single_process",
        "tests/distributed/test_vision_routing.py::test_routed_vit_matches_single_process_and_encodes_each_frame_once",
        "tests/e2e/test_vit_routing.py::test_each_image_is_encoded_once_and_losses_match_one_process",
    ],
    "loadable under another layout": ["tests/e2e/test_resume.py::test_resume_under_another_layout"],
    "SIGTERM/SIGUSR1 write one before exiting": [
        "tests/e2e/test_resume.py::test_sigterm_then_resume_is_bitwise_identical",
        "tests/unit/test_launch_scripts.py::test_torchrun_really_starts_workers_and_forwards_sigusr1",
        "keye_train/train/trainer.py: STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)",
    ],
    "continues exactly (same samples, same losses)": [
        "tests/e2e/test_resume.py::test_resume_in_the_same_layout_is_bitwise_identical"
    ],
    "A run killed before its first complete checkpoint restarts": [
        "tests/e2e/test_resume.py::test_preempted_runs_come_back_with_the_identical_command",
        "tests/unit/test_preflight.py::test_a_mistyped_checkpoint_dir_is_one_line_naming_both",
        "tests/unit/test_preflight.py::test_a_foreign_checkpoint_dir_or_config_is_refused_naming_both",
    ],
    "Metrics go to `<run_dir>/metrics.jsonl`": [
        "tests/unit/test_metrics.py::test_jsonl_records_every_step",
        "tests/unit/test_metrics.py::test_wandb_modes",
        "tests/unit/test_metrics.py::test_tensorboard_lazy",
    ],
    "Images follow the released resize rule": [
        "tests/parity/test_keye_vl_utils.py::test_smart_resize_matches",
        "tests/parity/test_keye_vl_utils.py::test_video_plan_matches_fetch_video",
    ],
    "Bad samples are skipped with their key and reason": [
        "tests/unit/test_fuzz_bad_input.py::test_every_bad_sample_skipped_and_counted",
        "tests/unit/test_loader_skips.py::test_skip_ceiling_holds_across_a_resume",
    ],
    "Every step is planned from the shard indexes": [
        "tests/unit/test_balance.py::test_lpt_within_two_percent_of_the_lower_bound",
        "tests/distributed/test_loader.py::test_every_planned_sample_is_loaded_by_exactly_one_replica",
        "tests/distributed/test_loader.py::test_only_the_stage0_tp0_rank_opens_shards_and_the_rest_receive",
    ],
    "a conversion that fails, is stopped (SIGTERM/SIGINT) or killed": [
        "tests/unit/test_conversion_crashes.py::test_kill_9_at_5_points_then_rerun_leaves_only_the_target",
        "tests/unit/test_conversion_crashes.py::test_sigterm_and_sigint_remove_the_staging_dir",
        "tests/unit/test_conversion_crashes.py::test_a_full_or_read_only_disk_is_one_line",
    ],
    "An export is a complete Hugging Face folder": ["tests/unit/test_hf_export.py::test_folder_is_complete"],
    "Import accepts folders with or without the unused packing table": [
        "tests/unit/test_hf_import.py::test_import_without_packing_table_and_head",
        "tests/unit/test_hf_import.py::test_round_trip_with_unused_tensors_is_bit_identical",
    ],
    "A run builds the architecture of the checkpoint it starts from": [
        "tests/unit/test_architecture.py::test_init_from_a_run_of_another_size_builds_that_size",
        "tests/unit/test_architecture.py::test_from_hf_builds_a_keye_qwen3_or_siglip_folders_architecture",
        "tests/unit/test_architecture.py::test_pilot_presets_have_the_public_parameter_counts",
    ],
    "The architecture and its conventions are in": ["docs/architecture.md", "docs/launch.md", "docs/perf.md"],
    "`make test` runs everything": [FRESH_CLONES],
    "`make test-fast` skips tests marked `slow`": ['Makefile: -m "not slow"'],
    "Markers: `dist`": ["pyproject.toml: dist: spawns several processes"],
    "`gpu` (the flash-attn tests": ["tests/unit/test_packing_invariance.py: pytest.mark.gpu"],
    "A docs check": ["tests/unit/test_docs_claims.py::test_the_check_finds_an_unexercised_claim_and_command"],
    "Parity tests compare against Hugging Face transformers": [
        "tests/parity/test_model_parity.py::test_packed_batch_matches_qwen3_per_document",
        "tests/parity/test_keye_vl_utils.py::test_preprocess_image_pixels_match_fetch_image",
        "tests/e2e/test_resume.py::test_resume_under_another_layout",
    ],
}


def _prose_sentences(text: str) -> list[str]:
    """The sentences of README.md outside code blocks, headings and tables (bullets joined in)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [line.strip().removeprefix("- ") for line in prose.splitlines()]
    joined = " ".join(line for line in lines if line and not line.startswith(("#", "|")))
    return [s for s in re.split(r"(?<=[.;])\s+(?=[A-Z`(])", joined) if s.strip()]


def _command_lines(text: str) -> list[str]:
    """The commands of README.md's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = [block.replace("\\\n", " ") for block in blocks]
    return [line.strip() for block in joined for line in block.splitlines() if line.strip()]


def _missing_evidence(evidence: str) -> str | None:
    """Why `evidence` does not exist, or None."""
    if "::" in evidence:
        path, name = evidence.split("::")
        found = (ROOT / path).is_file() and re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M)
        return None if found else f"no test {evidence}"
    path, _, text = evidence.partition(": ")
    if not (ROOT / path).is_file():
        return f"no file {path}"
    return None if text in (ROOT / path).read_text() else f"{path} does not say {text!r}"


def test_every_readme_command_and_claim_is_exercised_or_marked_not_verified():
    text = README.read_text()
    unexercised = []
    for line in _command_lines(text):
        if NOT_VERIFIED not in line and not any(line.startswith(c) for c in COMMANDS):
            unexercised.append(f"command: {line}")
    for sentence in _prose_sentences(text):
        if NOT_VERIFIED not in sentence and not any(phrase in sentence for phrase in CLAIMS):
            unexercised.append(f"claim: {sentence}")
    stale = [f"README no longer says: {phrase}" for phrase in CLAIMS if phrase not in " ".join(text.split())]
    stale += [
        f"README shows no command {c}"
        for c in COMMANDS
        if not any(ln.startswith(c) for ln in _command_lines(text))
    ]
    broken = [
        f"{item}: {problem}"
        for item, evidence in [*COMMANDS.items(), *CLAIMS.items()]
        for problem in map(_missing_evidence, evidence)
        if problem is not None
    ]
    assert unexercised + stale + broken == [], "\n".join(unexercised + stale + broken)


def test_the_check_finds_an_unexercised_claim_and_command():
    command = "```bash\nkeye-fly --to \\\n  moon   # lands softly\n```"
    text = f"Intro.\n\n{command}\n\nIt runs on a toaster. It also flies.\n"
    sentences = [s for s in _prose_sentences(text) if not any(p in s for p in CLAIMS)]
    commands = [c for c in _command_lines(text) if not any(c.startswith(k) for k in COMMANDS)]
    assert sentences == ["Intro.", "It runs on a toaster.", "It also flies."]
    assert commands == ["keye-fly --to    moon   # lands softly"]
    assert _missing_evidence("tests/unit/test_docs_claims.py::test_nothing_by_this_name") is not None


def test_make_help_lists_the_targets():
    make = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if make.returncode == 127:
        pytest.fail("make is not installed (README's two commands need it)")
    targets = {line.split()[0] for line in make.stdout.splitlines() if line.strip()}
    assert {"install", "demo", "test", "test-fast", "lint", "format"} <= targets, make.stdout


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys += _schema_keys(kind, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_every_recipe_key_is_in_docs_recipes():
    """Each key of the schema is named in docs/recipes.md (its last part in backticks, as the section
    tables write them)."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    undocumented = [
        key for key in _schema_keys(TrainConfig) if not re.search(rf"`[\w.]*\b{key.split('.')[-1]}\b`", doc)
    ]
    assert undocumented == [], f"keys missing from docs/recipes.md: {undocumented}"
