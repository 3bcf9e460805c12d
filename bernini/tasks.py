"""The task table: what each task type needs, its frame rule, default guidance mode and system prompt."""

from __future__ import annotations

from dataclasses import dataclass

_HELPER = "You are a helpful assistant"

# Prepended verbatim (no separator) to the positive prompt before UMT5, as in training.
SYSTEM_PROMPTS: dict[str, str] = {
    "default": f"{_HELPER}.",
    "t2i": f"{_HELPER} specialized in text-to-image generation.",
    "t2v": f"{_HELPER} specialized in text-to-video generation.",
    "i2i": f"{_HELPER} specialized in image editing.",
    "r2i": f"{_HELPER} specialized in subject-to-image generation.",
    "i2v": f"{_HELPER} specialized in image-to-video generation.",
    "v2v": f"{_HELPER} specialized in video editing.",
    "r2v": f"{_HELPER} specialized in subject-to-video generation.",
    "vi2v": f"{_HELPER} specialized in video editing on content propagation.",
    "rv2v": f"{_HELPER} specialized in video editing with reference.",
    "ads2v": f"{_HELPER} specialized in ads insertion.",
    "vrc2v": f"{_HELPER} for editing. You may need to adjust the subject's action or position.",
    "mv2v": (
        f"{_HELPER} for editing. You might need to adjust the video's style, lighting, colors, "
        "textures, and the subject's pose or action."
    ),
}
SYSTEM_PROMPTS["vr2v"] = SYSTEM_PROMPTS["rv2v"]  # the training name of rv2v

# The Wan2.2 default negative prompt; tokenized raw (no cleaning, no system prefix).
DEFAULT_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class Task:
    """One task type: the media it is meant for (the demo shows those inputs) and how it renders."""

    name: str
    default_mode: str
    videos: tuple[int, int] = (0, 0)  # (min, max) source videos it is meant for
    image: bool = False  # meant for the single source `image`
    images: tuple[int, int] = (0, 0)  # (min, max) reference images it is meant for
    single_frame: bool = False  # renders one frame to a .png whatever --num_frames says
    description: str = ""

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PROMPTS[self.name]

    def absent_inputs(self, videos: int, image: bool, images: int) -> tuple[str, ...]:
        """What this task expects that a case lacks. Such a case still renders, as upstream does: the media
        fields are read whatever the task, which only picks the system prompt (see plan.py's warnings)."""
        absent = []
        if videos < self.videos[0]:
            absent.append(f"{self.videos[0]} source video(s) under 'video' (the case has {videos})")
        if self.image and not image:
            absent.append("a source image under 'image' (the case has none)")
        if images < self.images[0]:
            absent.append(f"at least {self.images[0]} reference image(s) under 'images' (the case has {images})")
        return tuple(absent)


_MANY = 64
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("t2i", "t2v_apg", single_frame=True, description="text to image"),
        Task("t2v", "t2v_apg", description="text to video"),
        Task("i2i", "v2v", image=True, single_frame=True, description="image editing"),
        Task("v2v", "v2v_apg", videos=(1, 1), description="video editing"),
        Task("mv2v", "v2v_apg", videos=(1, 1), description="motion-changing video editing"),
        Task("rv2v", "rv2v", videos=(1, 1), images=(1, _MANY), description="video editing with reference images"),
        # The official gradio table says v2v_apg; one official launcher passes rv2v (see README).
        Task("ads2v", "v2v_apg", videos=(2, 2), images=(0, _MANY), description="video insertion (source + reference video)"),
        Task("r2v", "r2v_apg", images=(1, _MANY), description="reference images to video"),
        # Tasks the model was trained on that the official CLI also accepts.
        Task("r2i", "r2v_apg", images=(1, _MANY), single_frame=True, description="reference images to image"),
        Task("i2v", "v2v_apg", image=True, images=(0, _MANY), description="image to video"),
        Task("vi2v", "rv2v", videos=(1, 1), image=True, images=(0, _MANY), description="edit propagation from a first frame"),
        Task("vrc2v", "rv2v", videos=(1, 1), images=(0, _MANY), description="video editing that moves the subject"),
    )
}


def get_task(name: str) -> Task:
    """The task called `name`, or a ValueError listing the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task_type {name!r}; valid task types: {', '.join(TASKS)}") from None
