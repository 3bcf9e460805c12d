"""The command line built from the settings fields: every official flag and old alias parses with the official
meaning and default, --help names each default and the choices, each settings field has one flag, and the
conversion args -> settings loses nothing.

The official flags and defaults below are written out from the upstream README and its CLI reference
(/work/shared/docs/upstream-readme.md, bernini-r-reference.md §2), not read from bernini's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from bernini.cli import build_parser, runtime_from, settings_from
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.parallel.runner import build_parser as multi_gpu_parser
from bernini.tasks import DEFAULT_NEG_PROMPT

# The upstream CLI's flags: (flag, a value to give it or None for a switch, the setting it sets, the value expected).
OFFICIAL_FLAGS: list[tuple[str, list[str], str, object]] = [
    ("--use_unipc", [], "use_unipc", True),
    ("--no-use_unipc", [], "use_unipc", False),
    ("--use_src_tgt_id", [], "use_src_tgt_id", True),
    ("--no-use_src_tgt_id", [], "use_src_tgt_id", False),
    ("--interpolate_src_id", [], "interpolate_src_id", True),
    ("--no-interpolate_src_id", [], "interpolate_src_id", False),
    ("--max_trained_src_id", ["7"], "max_trained_src_id", 7),
    ("--neg_prompt", ["blurry"], "neg_prompt", "blurry"),
    ("--system_prompt", ["be brief"], "system_prompt", "be brief"),
    ("--num_frames", ["121"], "num_frames", 121),
    ("--max_image_size", ["1280"], "max_image_size", 1280),
    ("--height", ["720"], "height", 720),
    ("--width", ["1280"], "width", 1280),
    ("--num_inference_steps", ["30"], "num_inference_steps", 30),
    ("--guidance_mode", ["v2v_apg"], "guidance_mode", "v2v_apg"),
    ("--omega_vid", ["2.0"], "omega_vid", 2.0),
    ("--omega_img", ["3.5"], "omega_img", 3.5),
    ("--omega_txt", ["6"], "omega_txt", 6.0),
    ("--omega_V", ["2.5"], "omega_vid", 2.5),  # the first release's names (renamed 2026-06-11)
    ("--omega_I", ["1.5"], "omega_img", 1.5),
    ("--omega_TI", ["7"], "omega_txt", 7.0),
    ("--omega_scale", ["0.5"], "omega_scale", 0.5),
    ("--flow_shift", ["3"], "flow_shift", 3.0),
    ("--seed", ["7"], "seed", 7),
    ("--fps", ["24"], "fps", 24.0),
    ("--eta", ["0.25"], "eta", 0.25),
    ("--norm_threshold", ["40", "30"], "norm_threshold", (40.0, 30.0)),
    ("--momentum", ["-0.5"], "momentum", -0.5),
]
# The official flags that are not generation settings: (flag, value, the parsed argument, the value expected).
OFFICIAL_OTHER_FLAGS: list[tuple[str, list[str], str, object]] = [
    ("--config", ["cfg"], "config", "cfg"),
    ("--high_noise_ckpt", ["hi"], "high_noise_ckpt", "hi"),
    ("--low_noise_ckpt", ["lo"], "low_noise_ckpt", "lo"),
    ("--prompt", ["a cat"], "prompt", "a cat"),
    ("--task_type", ["t2v"], "task_type", "t2v"),
    ("--video", ["a.mp4", "b.mp4"], "video", ["a.mp4", "b.mp4"]),
    ("--image", ["a.png"], "image", "a.png"),
    ("--images", ["a.png", "b.png"], "images", ["a.png", "b.png"]),
    ("--output", ["out.mp4"], "output", "out.mp4"),
    ("--inputs", ["tasks.jsonl"], "inputs", "tasks.jsonl"),
    ("--case", ["case.json"], "case", ["case.json"]),
    ("--use_pe", [], "use_pe", True),
    ("--pe_model", ["gpt"], "pe_model", "gpt"),
    # The full-Bernini planner's flags: accepted, unused by the renderer.
    ("--omega_tgt", ["0.7"], "omega_tgt", 0.7),
    ("--planning_step", ["20"], "planning_step", 20),
    ("--vit_txt_cfg", ["1.5"], "vit_txt_cfg", 1.5),
    ("--vit_img_cfg", ["1.1"], "vit_img_cfg", 1.1),
    ("--vit_denoising_step", ["4"], "vit_denoising_step", 4),
]
# The upstream defaults (reference §2). guidance_mode and task_type are left out: the official rv2v/v2v globals are
# replaced by the case file's and the task's (README, "Differences from the official CLI").
OFFICIAL_DEFAULTS = {
    "use_unipc": True, "use_src_tgt_id": True, "interpolate_src_id": True, "max_trained_src_id": 5,
    "neg_prompt": DEFAULT_NEG_PROMPT, "system_prompt": "", "num_frames": 81, "max_image_size": 848, "height": 480,
    "width": 848, "num_inference_steps": 40, "omega_vid": 1.25, "omega_img": 4.5, "omega_txt": 4.0,
    "omega_scale": 0.8, "flow_shift": 5.0, "seed": 42, "fps": 16.0, "eta": 0.5, "norm_threshold": (50.0, 50.0, 50.0),
    "momentum": 0.0,
}  # fmt: skip
OFFICIAL_OTHER_DEFAULTS = {
    "config": "configs/bernini_renderer_wan22", "high_noise_ckpt": None, "low_noise_ckpt": None, "use_pe": False, "pe_model": None,
    "omega_tgt": 0.5, "planning_step": 25, "vit_txt_cfg": 1.2, "vit_img_cfg": 1.0, "vit_denoising_step": 5,
}  # fmt: skip
# Fields that have no flag of their own, and why: the launcher sets host_ranks; --lora/--lora_high/--lora_low give loras.
NOT_FLAGS = {RuntimeConfig: {"host_ranks", "loras"}, GenerationSettings: set()}


def parse(*argv: str, multi_gpu: bool = False) -> argparse.Namespace:
    return build_parser("test", multi_gpu=multi_gpu).parse_args(list(argv))


@pytest.mark.parametrize("multi_gpu", [False, True])
@pytest.mark.parametrize(("flag", "value", "name", "expected"), OFFICIAL_FLAGS, ids=[f[0] for f in OFFICIAL_FLAGS])
def test_every_official_generation_flag_sets_its_setting(flag: str, value: list[str], name: str, expected: object, multi_gpu: bool) -> None:
    settings = settings_from(parse(flag, *value, multi_gpu=multi_gpu))
    assert getattr(settings, name) == expected
    changed = {k for k, v in dataclasses.asdict(settings).items() if v != dataclasses.asdict(GenerationSettings())[k]}
    assert changed <= {name}  # nothing else moved


@pytest.mark.parametrize("multi_gpu", [False, True])
@pytest.mark.parametrize(("flag", "value", "name", "expected"), OFFICIAL_OTHER_FLAGS, ids=[f[0] for f in OFFICIAL_OTHER_FLAGS])
def test_every_other_official_flag_parses(flag: str, value: list[str], name: str, expected: object, multi_gpu: bool) -> None:
    assert getattr(parse(flag, *value, multi_gpu=multi_gpu), name) == expected


def test_official_defaults() -> None:
    args = parse()
    settings = settings_from(args)
    assert {name: getattr(settings, name) for name in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    assert {name: getattr(args, name) for name in OFFICIAL_OTHER_DEFAULTS} == OFFICIAL_OTHER_DEFAULTS
    assert parse(multi_gpu=True).ulysses == 1 and parse("--ulysses", "8", multi_gpu=True).ulysses == 8


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert settings_from(parse()) == GenerationSettings()
    assert runtime_from(parse()) == RuntimeConfig()
    assert settings_from(parse(multi_gpu=True)) == GenerationSettings()


@pytest.mark.parametrize("cls", [GenerationSettings, RuntimeConfig])
def test_each_settings_field_has_exactly_one_flag(cls: type) -> None:
    actions = build_parser("test", multi_gpu=True)._actions
    for spec in dataclasses.fields(cls):
        mine = [a for a in actions if a.dest == spec.name]
        if spec.name in NOT_FLAGS[cls]:
            assert mine == [], spec.name
        else:
            assert len(mine) == 1, spec.name
            assert f"--{spec.name}" in mine[0].option_strings


def _other_value(spec: dataclasses.Field, action: argparse.Action) -> tuple[list[str], object]:
    """argv for a value of the field other than its default, and that value as the field holds it."""
    default = spec.default
    if isinstance(action, argparse.BooleanOptionalAction):
        return ([f"--no-{spec.name}"], False) if default else ([f"--{spec.name}"], True)
    if action.choices:
        choice = next(str(c) for c in action.choices if c != default)
        return [f"--{spec.name}", choice], choice
    if action.nargs == "+":
        return [f"--{spec.name}", "1.5", "2.5"], (1.5, 2.5)
    if action.type in (int, float):  # twice the default stays within every range rule
        number = action.type(2 * default if default else 3)
        return [f"--{spec.name}", str(number)], number
    return [f"--{spec.name}", "cpu" if spec.name == "device" else "some text"], "cpu" if spec.name == "device" else "some text"


@pytest.mark.parametrize(("cls", "convert"), [(GenerationSettings, settings_from), (RuntimeConfig, runtime_from)])
def test_every_flag_reaches_its_field(cls: type, convert) -> None:
    """Each flag changes its field and only it: the generated conversion forgets none."""
    actions = {a.dest: a for a in build_parser("test")._actions}
    for spec in dataclasses.fields(cls):
        if spec.name in NOT_FLAGS[cls] or spec.name == "preset":  # a preset sets other flags (test_fewstep)
            continue
        argv, value = _other_value(spec, actions[spec.name])
        converted = convert(parse(*argv))
        assert getattr(converted, spec.name) == value, argv
        assert dataclasses.replace(converted, **{spec.name: spec.default}) == cls(), argv


def test_solver_and_use_unipc_are_one_setting() -> None:
    assert settings_from(parse("--solver", "euler")).use_unipc is False
    assert settings_from(parse("--solver", "unipc")).use_unipc is True
    assert settings_from(parse("--no-use_unipc", "--solver", "euler")).solver == "euler"
    with pytest.raises(ValueError, match="--solver unipc contradicts --no-use_unipc"):
        settings_from(parse("--no-use_unipc", "--solver", "unipc"))


@pytest.mark.parametrize(("argv", "expected"), [(("--no-batch_combos",), False), (("--batch_combos",), True), (("--no-batch_passes",), False), ((), True)])
def test_batch_passes_keeps_its_earlier_name(argv: tuple[str, ...], expected: bool) -> None:
    # --batch_combos was the flag's name until the code said "passes" everywhere; scripts still use it.
    assert runtime_from(parse(*argv)).batch_passes is expected


def test_planner_guidance_modes_parse_and_are_refused_by_name() -> None:
    args = parse("--guidance_mode", "vae_txt_vit_wapg")
    with pytest.raises(ValueError, match="--guidance_mode vae_txt_vit_wapg belongs to the full Bernini planner"):
        settings_from(args)


def test_fast_fills_only_the_fast_options_not_named() -> None:
    assert runtime_from(parse("--fast")) == RuntimeConfig(fp8_gemm="auto", fp8_attention="auto")
    assert runtime_from(parse("--fast", "--fp8_gemm", "off")) == RuntimeConfig(fp8_gemm="off", fp8_attention="auto")
    assert runtime_from(parse("--fp8_attention")) == RuntimeConfig(fp8_attention="auto")  # alone: auto


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_frames", "0"], "invalid generation setting: num_frames must be >= 1 and at most 1001"),
        (["--flow_shift", "0"], r"flow_shift must be > 0, got --flow_shift 0.0; the default is --flow_shift 5.0"),
        (["--norm_threshold", "1", "2", "3", "4"], "norm_threshold needs 1 to 3 values"),
        (["--switch_step", "50"], r"switch_step must be an integer from 0 to num_inference_steps \(40\)"),
    ],
)
def test_bad_values_name_the_flag_the_rule_and_the_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from(parse(*argv))


def test_runtime_rules_name_the_flag() -> None:
    with pytest.raises(ValueError, match="invalid runtime setting: device must be cuda, cuda:N .* got --device gpu0; the default is --device cuda"):
        runtime_from(parse("--device", "gpu0"))
    with pytest.raises(ValueError, match="offload must be one of auto, none, expert, block"):
        RuntimeConfig(offload="disk")  # a Python caller, past argparse's choices
    with pytest.raises(ValueError, match="drop one of the two flags"):
        runtime_from(parse("--weights", "fp8", "--fp8_gemm", "torchao"))


@pytest.mark.parametrize(("flag", "choices"), [("--offload", "{auto,none,expert,block}"), ("--weights", "{bf16,fp8}"), ("--dtype", "{bfloat16,float16,float32}"),
                                               ("--attention", "{auto,fa3,fa4,fa2,sdpa}"), ("--solver", "{unipc,euler}")])
def test_a_bad_choice_is_refused_with_the_choices(flag: str, choices: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(flag, "bogus")
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "invalid choice: 'bogus'" in err
    assert choices.strip("{}").replace(",", "', '") in err


def _help_blocks(text: str) -> dict[str, str]:
    """--help text -> {flag: its help text}, one entry per option spelling."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            current = [s.split()[0] for s in match[1].split(", ")]
            for flag in current:
                blocks[flag] = match[2] or ""
        elif line.startswith("    ") and current:
            for flag in current:
                blocks[flag] += " " + line.strip()
        else:
            current = []
    return blocks


@pytest.mark.parametrize(
    ("flag", "shown"),
    [
        ("--num_frames", "(default: 81)"), ("--max_image_size", "(default: 848)"), ("--height", "(default: 480)"),
        ("--width", "(default: 848)"), ("--num_inference_steps", "(default: 40)"), ("--omega_vid", "(default: 1.25)"),
        ("--omega_V", "(default: 1.25)"), ("--omega_img", "(default: 4.5)"), ("--omega_txt", "(default: 4.0)"),
        ("--omega_scale", "(default: 0.8)"), ("--flow_shift", "(default: 5.0)"), ("--seed", "(default: 42)"),
        ("--fps", "(default: 16.0)"), ("--eta", "(default: 0.5)"), ("--norm_threshold", "(default: 50.0 50.0 50.0)"),
        ("--momentum", "(default: 0.0)"), ("--max_trained_src_id", "(default: 5)"), ("--use_unipc", "(default: on)"),
        ("--config", "(default: configs/bernini_renderer_wan22)"), ("--ulysses", "(default: 1)"),
        ("--offload", "(default: auto)"), ("--weights", "(default: bf16)"), ("--dtype", "(default: bfloat16)"),
        ("--device", "(default: cuda)"), ("--fp8_gemm", "(default: off; alone: auto)"), ("--output_dir", "(default: outputs)"),
        ("--compile", "(default: on for CUDA, off on the CPU)"), ("--neg_prompt", "(default: the Wan2.2 negative prompt)"),
    ],
)  # fmt: skip
def test_help_shows_the_defaults(flag: str, shown: str) -> None:
    blocks = _help_blocks(build_parser("test", multi_gpu=True).format_help())
    assert shown in " ".join(blocks[flag].split())


def test_help_names_a_default_for_every_flag_that_has_one() -> None:
    parser = multi_gpu_parser("test")
    blocks = _help_blocks(parser.format_help())
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        assert blocks[action.option_strings[0]].strip(), f"{action.option_strings[0]} has no help"
        if action.default not in (None, False):
            assert "default" in blocks[action.option_strings[0]], f"{action.option_strings[0]} does not name its default"


def test_help_lists_the_choices_and_keeps_the_groups_in_order() -> None:
    text = build_parser("test", multi_gpu=True).format_help()
    assert "--offload {auto,none,expert,block}" in text and "--fp8_attention [{off,auto,cudnn_fp8,sage}]" in text
    groups = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    expected = ["model", "inputs", "generation", "LoRAs and few-step schedules (bernini)", "prompt enhancer", "runtime (bernini)",
                "fast mode (bernini; lossy, each option off unless named)", "batch (bernini)", "multi-GPU"]
    assert [g for g in groups if g in expected] == expected
    assert "--omega_tgt" not in text  # the planner's flags parse but stay out of --help
