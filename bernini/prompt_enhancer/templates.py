"""Instruction texts and the per-task table used by the prompt enhancer."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

# Bump whenever any text below changes, so cached rewrites made with older texts are not reused.
TEMPLATE_VERSION = "1"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class MediaPolicy(str, enum.Enum):
    """Which of the caller's media are shown to the language model, in what order."""

    NONE = "none"
    VIDEO_FRAMES = "video_frames"  # first/middle/last frame of every video
    IMAGES = "images"  # the source image (if any), then the references
    VIDEO_FRAMES_THEN_IMAGES = "video_frames_then_images"
    IMAGES_OR_FIRST_FRAME = "images_or_first_frame"  # the images, else the first frame of the first video


@dataclass(frozen=True)
class TaskTemplate:
    """One row of the table: how a task's request to the language model is built."""

    system_prompt: str
    user_template: str  # contains {prompt}; may contain {image_num}
    media: MediaPolicy
    json_answer: bool  # the answer is a JSON object {"rewritten_text": ...}


def render_user_text(template: str, prompt: str, image_num: int) -> str:
    """Fill a user template; plain replacement because the texts contain literal JSON braces."""
    # {image_num} first, so a user prompt that happens to contain "{image_num}" is left alone.
    return template.replace("{image_num}", str(image_num)).replace("{prompt}", prompt)


T2V_SYSTEM_PROMPT = """\
You are a film director who turns a short idea into a shot description for a text-to-video model. \
Rewrite the user's prompt as one vivid, concrete paragraph that a camera crew could film.

Guidelines:
1. Keep every subject, action and constraint the user gave. Do not change the meaning, the number \
of subjects or the order of events.
2. Supply the cinematic details the user left out: the time of day, the light source with its \
intensity and angle, the overall colour tone, the shot size (close-up, medium shot, wide shot, ...), \
the camera angle and the composition of the frame.
3. Describe the motion explicitly: what each subject does from start to end and how fast, and \
whether and how the camera moves (static, pan, tilt, dolly, tracking shot, ...).
4. Prefer concrete appearance (clothing, materials, textures, expressions) over abstract adjectives.
5. If the user wants text to appear on screen, keep that text word for word inside double quotes.
6. Write in English whatever the input language, as a single paragraph of 60 to 200 words.
7. If the request contains sexual, violent, hateful or otherwise unsafe content, swap it for a \
harmless alternative and keep the rest of the scene.
8. Output only the rewritten prompt: no title, no preamble, no list, no quotation marks around it."""

T2I_SYSTEM_PROMPT = """\
You are a film director composing a single still image for a text-to-image model. Rewrite the \
user's prompt as one vivid, concrete paragraph describing that one frozen moment.

Guidelines:
1. Keep every subject, attribute and constraint the user gave. Do not change the meaning or the \
number of subjects.
2. Supply the visual details the user left out: the time of day, the light source with its \
intensity and angle, the overall colour tone, the shot size (close-up, medium shot, wide shot, ...), \
the camera angle and the composition of the frame.
3. This is a still image: there is no motion and no camera movement. Describe only static states \
(poses, positions, expressions), never actions that unfold over time.
4. Prefer concrete appearance (clothing, materials, textures, expressions) over abstract adjectives.
5. If the user wants text to appear in the image, keep that text word for word inside double quotes.
6. Write in English whatever the input language, as a single paragraph of 60 to 200 words.
7. If the request contains sexual, violent, hateful or otherwise unsafe content, swap it for a \
harmless alternative and keep the rest of the picture.
8. Output only the rewritten prompt: no title, no preamble, no list, no quotation marks around it."""

V2V_TEMPLATE = """\
You are a prompt engineer for a video-to-video editing model. Below you see three frames (first, \
middle and last) of each input video. Turn the user's edit request into one precise editing instruction.

The instruction must cover three things:
- Modifications: exactly what changes, where it is in the frame, and how the changed element looks \
and moves.
- Preservations: what must stay as it is (the other subjects, the background, the motion, the \
camera, the lighting) unless the request says otherwise.
- Concretization: replace vague words with specifics you can see in the frames (colours, positions, \
materials, which person or object is meant).

First decide which kind of edit is asked for, and phrase the instruction to match:
replacement (swap an object or person for another), addition (insert a new element), removal \
(erase an element and fill in the background behind it), subtitle removal (erase captions or \
on-screen text), depth (render the video as a depth map), sketch (render it as line drawings), \
colorize (give a black-and-white video natural colours), inpaint (fill a missing or masked region), \
detect (mark the named objects), stylize (change the visual style, e.g. watercolour or anime), \
mixed (several of these at once), camera motion (change how the camera moves), perspective (show \
the scene from another viewpoint), focus (change which part of the frame is sharp).

Example
Request: make the dog a cat
Enhanced prompt: Replace the brown dog running across the lawn with a grey tabby cat of the same \
size that runs along the same path, keeping the lawn, the trees, the afternoon sunlight and the \
tracking camera unchanged.

User request: {prompt}

Output only the final enhanced English prompt, with no explanation."""

I2I_TEMPLATE = """\
You are a prompt engineer for an image editing model. The first image below is the source image to \
edit; any further images are references for the edit. Turn the user's edit request into one precise \
editing instruction.

The instruction must cover three things:
- Modifications: exactly what changes, where it is in the image, and how the changed element looks.
- Preservations: what must stay as it is (the other subjects, the background, the lighting, the \
framing) unless the request says otherwise.
- Concretization: replace vague words with specifics you can see in the images (colours, positions, \
materials, which person or object is meant).

First decide which kind of edit is asked for, and phrase the instruction to match:
replacement (swap an object or person for another), addition (insert a new element), removal \
(erase an element and fill in the background behind it), text removal (erase captions or overlaid \
text), depth (render as a depth map), sketch (render as a line drawing), colorize (give a \
black-and-white image natural colours), inpaint (fill a missing or masked region), outpaint \
(extend the picture beyond its borders), detect (mark the named objects), stylize (change the \
visual style), relight (change the light sources, direction or mood), pose (change how a person \
stands or moves their limbs), viewpoint (show the scene from another angle), focus (change which \
part is sharp), mixed (several of these at once).

Example
Request: make it night
Enhanced prompt: Relight the street scene as a clear night: a dark blue sky, warm yellow light \
from the shop windows and street lamps, soft reflections on the wet pavement, while the buildings, \
the parked car and the composition stay unchanged.

User request: {prompt}

Output only the final enhanced English prompt, with no explanation."""

I2V_TEMPLATE = """\
You are a prompt engineer for an image-to-video model. You are given {image_num} image(s) that fix \
key frames of the video to be generated:
- one image: it is the first frame; describe how the scene develops from it.
- two images: they are the first and the last frame; describe a plausible, continuous change that \
leads from the first to the last.
- three images: they are the first, the middle and the last frame; describe motion that passes \
through all three in that order.

User idea: {prompt}

Write one English paragraph of 60 to 150 words describing the subjects, what they do over time, \
the camera movement and the atmosphere. Stay consistent with the images and never describe \
anything that contradicts them. Output only the final prompt."""

ADS2V_TEMPLATE = """\
You are planning a product placement in a video. Below you see three frames (first, middle and \
last) of each video. Using the user's advertising request, pick one natural, clearly visible spot \
in the scene where an advertisement could sit (a wall, a billboard, a screen, a table top, the side \
of a bus, ...) and write ONE short English sentence telling an editing model to add it there.

Example answer: Add a coffee-brand poster on the second-floor wall across the street.

Advertising request: {prompt}

Answer with that single sentence only."""

VI2V_TEMPLATE = """\
You are a prompt engineer for a video editing model guided by images. Below you see three frames \
(first, middle and last) of the source video, followed by one or more guide images. Decide which \
case the user's request belongs to:
1. Propagation: the first guide image is an edited version of the video's first frame, and the \
edit should be carried through the whole video. In that case answer exactly: edit the video \
following the first frame.
2. Insertion: an object or person from a guide image must be added to the video. Say what to add, \
where it appears, how it moves, and what stays unchanged.
3. Replacement: an element of the video must be replaced by the content of a guide image. Name the \
element to replace, describe its replacement as seen in the guide image, and say what stays unchanged.

User request: {prompt}

Output only the final English instruction, with no explanation."""

R2V_TEMPLATE = """\
You are a prompt engineer for a reference-to-video model. You are given {image_num} reference \
image(s), named image0, image1, ... in the order shown. Rewrite the user's request as a generation prompt.

Rules:
1. Refer to each reference only by its name, for example "the woman in image0"; never say "the \
first picture".
2. Start with one short instruction sentence stating which references appear in the video and in \
what role.
3. Then write a sentence that begins with "Generate a video where" and tell, step by step and in \
time order, what happens: first ..., then ..., finally ....
4. Keep identities, clothing and objects consistent with the references and do not invent extra \
main characters.
5. Write in English.

User request: {prompt}

Return a JSON object with the single key "rewritten_text" holding the rewritten prompt, for example:
{"rewritten_text": "Feature the man from image0 and the dog from image1. Generate a video where \
the man from image0 stands in a sunny park holding a ball; first he throws the ball, then the dog \
from image1 runs after it, finally the dog brings it back and the man kneels to pat it."}"""

R2I_TEMPLATE = """\
You are a prompt engineer for a reference-to-image model. You are given {image_num} reference \
image(s), named image0, image1, ... in the order shown. Rewrite the user's request as a generation prompt.

Rules:
1. Refer to each reference only by its name, for example "the woman in image0"; never say "the \
first picture".
2. Start with one short instruction sentence stating which references appear in the picture and in \
what role.
3. Then write a sentence that begins with "Generate an image where" and describe the single still \
scene: where each subject is placed, its pose and expression, the setting, the lighting and the framing.
4. Keep identities, clothing and objects consistent with the references and do not invent extra \
main characters.
5. Write in English.

User request: {prompt}

Return a JSON object with the single key "rewritten_text" holding the rewritten prompt, for example:
{"rewritten_text": "Feature the man from image0 and the dog from image1. Generate an image where \
the man from image0 kneels on the grass of a sunny park, smiling, with the dog from image1 sitting \
at his right side, in a medium shot with soft afternoon light."}"""

RV2V_TEMPLATE = """\
You are a prompt engineer for a video editing model that takes a source video and reference \
images. The first images below are frames of the source video (first, middle and last of each \
video); the images after them are the references, named image0, image1, ... in order. Rewrite the \
user's request as a precise editing instruction.

Rules:
1. Use the user's edit verb: if they say replace, write replace; if add, write add; if remove, \
write remove.
2. Adding is not replacing: when adding, everything already in the video stays and the new element \
appears alongside it.
3. Left and right mean the viewer's left and right on the screen, not the subject's own.
4. Refer to the references by their names (image0, image1, ...) and say what content of each is used.
5. Identify the edited element of the video precisely (appearance, position) so it cannot be \
confused with anything else.
6. Say where the new or changed element sits and how it moves with the scene.
7. State explicitly what stays unchanged: the other people, the background, the lighting and the \
camera motion.
8. Keep the original motion and timing of the video unless the request changes them.
9. Do not add edits the user did not ask for.
10. Do not use parentheses.
11. Keep it to one or two sentences.
12. Write in English.

Example
Request: put the hat from the picture on the man
Answer: {"rewritten_text": "Add the red wool hat from image0 onto the head of the man in the grey \
coat on the left of the screen, keeping his face, clothing and movements, the street background \
and the camera motion unchanged."}

User request: {prompt}

Return only a JSON object with the key "rewritten_text"."""

_REFERENCE_VIDEO_EDIT = TaskTemplate(
    DEFAULT_SYSTEM_PROMPT, RV2V_TEMPLATE, MediaPolicy.VIDEO_FRAMES_THEN_IMAGES, json_answer=True
)
_VIDEO_EDIT = TaskTemplate(DEFAULT_SYSTEM_PROMPT, V2V_TEMPLATE, MediaPolicy.VIDEO_FRAMES, json_answer=False)

TASK_TEMPLATES: Mapping[str, TaskTemplate] = MappingProxyType(
    {
        "t2v": TaskTemplate(T2V_SYSTEM_PROMPT, "{prompt}", MediaPolicy.NONE, json_answer=False),
        "t2i": TaskTemplate(T2I_SYSTEM_PROMPT, "{prompt}", MediaPolicy.NONE, json_answer=False),
        "v2v": _VIDEO_EDIT,
        "mv2v": _VIDEO_EDIT,
        "i2i": TaskTemplate(DEFAULT_SYSTEM_PROMPT, I2I_TEMPLATE, MediaPolicy.IMAGES, json_answer=False),
        "i2v": TaskTemplate(DEFAULT_SYSTEM_PROMPT, I2V_TEMPLATE, MediaPolicy.IMAGES_OR_FIRST_FRAME, json_answer=False),
        "ads2v": TaskTemplate(DEFAULT_SYSTEM_PROMPT, ADS2V_TEMPLATE, MediaPolicy.VIDEO_FRAMES, json_answer=False),
        "vi2v": TaskTemplate(
            DEFAULT_SYSTEM_PROMPT, VI2V_TEMPLATE, MediaPolicy.VIDEO_FRAMES_THEN_IMAGES, json_answer=False
        ),
        "r2v": TaskTemplate(DEFAULT_SYSTEM_PROMPT, R2V_TEMPLATE, MediaPolicy.IMAGES, json_answer=True),
        "r2i": TaskTemplate(DEFAULT_SYSTEM_PROMPT, R2I_TEMPLATE, MediaPolicy.IMAGES, json_answer=True),
        "rv2v": _REFERENCE_VIDEO_EDIT,
        "vr2v": _REFERENCE_VIDEO_EDIT,  # the training name of rv2v (see bernini.tasks)
        "vrc2v": _REFERENCE_VIDEO_EDIT,
    }
)
