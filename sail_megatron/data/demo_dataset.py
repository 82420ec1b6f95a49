"""The embedded demo dataset: real photographs that ship inside scikit-image's wheel, with
hand-written captions and LLaVA-format SFT conversations, plus a tokenizer trained on that text.

`write_demo_raw` writes the raw files only; a separate `prepare` step turns them into shards.
Only images whose scikit-image docstring states a free licence (CC0 / public domain / no known
copyright restrictions) are used; `page`, `moon`, the Middlebury motorcycle pair and the logo state
none, so they are left out. Every output is deterministic (fixed encoder settings, sorted keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sail_megatron.data.tokenizer import IM_END, IM_START, build_demo_tokenizer

IMAGE_PLACEHOLDER = "<image>"
DEMO_VOCAB_SIZE = 2048
_JPEG = dict(quality=90, subsampling=2, optimize=False, progressive=False)  # fixed: identical bytes
_PNG = dict(compress_level=6, optimize=False)


@dataclass(frozen=True)
class DemoRawPaths:
    images_dir: Path
    captions_jsonl: Path
    sft_jsonl: Path
    tokenizer_dir: Path


@dataclass(frozen=True)
class _Photo:
    file: str
    source: str  # skimage.data function name
    credit: str
    licence: str
    crop: tuple[slice, slice] | None = None

    def load(self) -> np.ndarray:
        """HxW or HxWx3 array, uint8 or bool."""
        import skimage.data

        img = getattr(skimage.data, self.source)()
        return img[self.crop] if self.crop is not None else img


# Licence statements are quoted from each function's docstring in skimage.data (v0.26).
_PHOTOS: dict[str, _Photo] = {
    p.file.split(".")[0]: p
    for p in [
        _Photo(
            "astronaut.jpg",
            "astronaut",
            "NASA (Great Images database), Eileen Collins portrait",
            "No known copyright restrictions, released into the public domain",
        ),
        _Photo("chelsea.jpg", "chelsea", "Stefan van der Walt", "CC0"),
        _Photo("coffee.jpg", "coffee", "Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
        _Photo("rocket.jpg", "rocket", "SpaceX, DSCOVR launch photo", "Public domain (released by SpaceX)"),
        # A tall narrow crop of the same photo, so the tiler sees an extreme aspect ratio.
        _Photo(
            "rocket_tall.jpg",
            "rocket",
            "SpaceX, DSCOVR launch photo (cropped)",
            "Public domain (released by SpaceX)",
            crop=(slice(None), slice(250, 410)),
        ),
        _Photo("horse.png", "horse", "Andreas Preuss (marauder), openclipart", "CC0"),
        _Photo(
            "hubble_deep_field.jpg",
            "hubble_deep_field",
            "NASA, Hubble eXtreme Deep Field",
            "Public domain (NASA media guidelines)",
        ),
        _Photo("retina.jpg", "retina", "Mikael Häggström, Wikimedia Commons", "CC0 1.0"),
        _Photo(
            "text.png",
            "text",
            "Wikipedia, File:Corner.png",
            "No known copyright restrictions, released into the public domain",
        ),
        _Photo("camera.jpg", "camera", "Lav Varshney", "CC0"),
        _Photo("coins.jpg", "coins", "Brooklyn Museum open collection", "No known copyright restrictions"),
        _Photo(
            "ihc.jpg",
            "immunohistochemistry",
            "Center for Microscopy And Molecular Imaging (CMMI)",
            "No known copyright restrictions",
        ),
        _Photo("cell.png", "cell", "Paul Müller et al., quantitative phase image", "CC0"),
        _Photo("brick.jpg", "brick", "CC0Textures (Bricks25), transformed by scikit-image", "CC0"),
        _Photo("gravel.jpg", "gravel", "CC0Textures (Gravel04), transformed by scikit-image", "CC0"),
        _Photo("grass.jpg", "grass", "linolafett, DeviantArt (Grass-01), cropped by scikit-image", "CC0"),
    ]
}

_CAPTIONS: dict[str, list[str]] = {
    "astronaut": [
        "A studio portrait of a smiling astronaut with short light-brown hair, wearing an orange pressure "
        "suit with mission patches, in front of an American flag and a model of the Space Shuttle.",
        "Official NASA portrait of astronaut Eileen Collins in an orange launch-and-entry suit; a black "
        "helmet rests in the lower right corner.",
        "A woman in an orange spacesuit smiles at the camera. The US flag hangs on the left and a white "
        "shuttle model with its orange-brown external tank stands on the right.",
    ],
    "chelsea": [
        "A close-up of a tabby cat's face with large yellow-green eyes, a pink nose and long white whiskers.",
        "Chelsea the cat, a brown striped tabby, gazes just past the camera against a soft, blurred background.",
        "Portrait of a short-haired tabby cat; dark stripes run over its forehead and its face fills the frame.",
    ],
    "coffee": [
        "A cup of espresso with a layer of golden crema, served in a red cup on a matching saucer with a "
        "silver spoon, on a wooden table.",
        "Seen from above at an angle, a small reddish-brown espresso cup with a white interior sits on a "
        "saucer on a worn wooden surface.",
        "A single shot of espresso on a red saucer, a teaspoon resting beside the cup.",
    ],
    "rocket": [
        "A white SpaceX Falcon 9 rocket stands on the launch pad at dusk, flanked by tall steel lattice "
        "towers under a deep blue sky.",
        "A launch pad at twilight: the rocket in the centre is lit from below, and bright pad lights along "
        "the ground make star-shaped glare.",
        "The Falcon 9 that carried the DSCOVR satellite, standing upright at Cape Canaveral before liftoff.",
    ],
    "rocket_tall": [
        "A tall, narrow view of a white rocket standing upright against a dark blue evening sky, with a "
        "glowing light at its base.",
        "Vertical crop of a Falcon 9 on its pad: the slender white body and rounded nose fill the middle of the frame.",
    ],
    "horse": [
        "A solid black silhouette of a horse standing in profile, facing right, on a plain white background.",
        "A clip-art horse drawn as a flat black shape on white, with its tail hanging down and all four legs visible.",
        "Black-and-white graphic of a standing horse with its head raised and ears pointed up.",
    ],
    "hubble_deep_field": [
        "The Hubble eXtreme Deep Field: thousands of distant galaxies of many shapes and colours scattered "
        "across a black sky.",
        "A deep space image filled with small spiral and elliptical galaxies in white, blue, orange and red, "
        "plus a few foreground stars with diffraction spikes.",
        "A photograph from the Hubble Space Telescope showing one of the farthest views of the universe ever taken.",
    ],
    "retina": [
        "A fundus photograph of a healthy human retina: an orange-red background, a bright yellowish optic "
        "disc on the left and blood vessels branching across the eye.",
        "A medical image of the back of a left eye showing the optic disc, the darker macula in the centre "
        "and a network of blood vessels, inside a black circular border.",
        "Red retina photographed through the pupil, with thin vessels spreading out from a bright spot on "
        "the left side.",
    ],
    "text": [
        "A grayscale close-up of handwritten mathematical formulas on lined paper, photographed at a steep angle.",
        "Handwritten equations in dark ink on ruled paper, with parentheses, equals signs and the letters s and t.",
    ],
    "camera": [
        "A black-and-white photo of a man in a dark overcoat filming with a video camera mounted on a "
        "tripod, standing on a grassy field.",
        "A cameraman looks through the viewfinder of a camcorder on a tripod; behind him are an open lawn, "
        "domed buildings and a tall tower under a clear sky.",
        "A man in gloves and a long coat leans into a tripod-mounted camera on a wide field.",
    ],
    "coins": [
        "A black-and-white photograph of 24 ancient Greek coins arranged in four rows of six on a dark background.",
        "Greek coins found at Pompeii, most stamped with a head in profile, laid out in a grid for a museum "
        "record photo.",
    ],
    "ihc": [
        "A microscope image of colon tissue stained with immunohistochemistry: brown-stained glands "
        "surrounded by pale connective tissue with blue nuclei.",
        "A histology slide showing colonic glands whose cells are outlined in brown DAB stain, with a blue "
        "hematoxylin counterstain marking the cell nuclei.",
    ],
    "cell": [
        "A grayscale quantitative phase image of a single round cell, a bright disk right of centre on a "
        "mottled gray background.",
        "Microscopy image of a cell floating in saline: a bright circle with a dark rim, and faint ripples "
        "across the background.",
    ],
    "brick": [
        "A grayscale close-up of a brick wall, rotated so the rows of bricks run vertically, seen at a slight angle.",
        "Long rectangular bricks separated by light mortar joints in a staggered pattern.",
    ],
    "gravel": [
        "A grayscale top-down view of loose gravel made of many small, angular stones.",
        "Crushed stone texture: hundreds of sharp-edged pebbles of similar size fill the whole frame.",
    ],
    "grass": [
        "A grayscale close-up of a lawn, with thin grass blades crossing in every direction and a few small "
        "rounded leaves.",
        "Grass seen from above in black and white, a dense tangle of blades filling the picture.",
    ],
}

# (images, [(question, answer), ...]); the writer puts one <image> per image in the first question,
# except where a question already places its own placeholder.
_Turns = list[tuple[str, str]]
_SFT: list[tuple[list[str], _Turns]] = [
    (
        ["astronaut"],
        [
            (
                "Who or what is shown in this photo?",
                "It is a formal portrait of an astronaut: a smiling woman with short light-brown hair in an orange "
                "spacesuit. An American flag hangs behind her on the left and a model of the Space Shuttle stands on "
                "the right.",
            ),
            (
                "What is on the round patch on her chest?",
                "A round purple mission patch with a space shuttle, a satellite and small American and French flags. "
                "The crew names Collins, Ashby, Coleman, Hawley and Tognini run around its edge.",
            ),
            (
                "What is in the lower right corner?",
                "A dark spacesuit helmet whose glossy shell reflects the studio lights.",
            ),
        ],
    ),
    (
        ["astronaut"],
        [
            (
                "What colour is the spacesuit?",
                "Bright orange. It is the launch-and-entry suit that shuttle crews wore, with a metal ring around the "
                "neck where the helmet attaches.",
            ),
        ],
    ),
    (
        ["chelsea"],
        [
            (
                "What animal is this?",
                "A cat: a short-haired brown tabby, photographed so close that its face fills most of the frame.",
            ),
            ("What colour are its eyes?", "Yellow-green, with large dark pupils."),
        ],
    ),
    (
        ["chelsea"],
        [
            (
                "Describe the background.",
                "It is out of focus: soft white and beige shapes that keep the attention on the cat's face.",
            ),
        ],
    ),
    (
        ["coffee"],
        [
            (
                "What drink is in the cup?",
                "Espresso. The small cup holds a short shot topped with a smooth, caramel-coloured layer of crema.",
            ),
            (
                "Where is the spoon?",
                "On the saucer to the right of the cup, with its handle pointing away from the viewer.",
            ),
        ],
    ),
    (
        ["coffee"],
        [
            (
                "What is the table made of?",
                "Wood. The tabletop is a warm brown with visible grain, scratches and worn patches.",
            ),
        ],
    ),
    (
        ["rocket"],
        [
            (
                "What is happening in this picture?",
                "A white rocket stands on its launch pad at dusk, ready for launch. Tall lattice towers surround it "
                "and lights glow at ground level.",
            ),
            (
                "How many tall towers can you see?",
                "Four: two wide lattice towers at the left and right edges of the frame and two thinner masts closer "
                "to the rocket.",
            ),
        ],
    ),
    (
        ["rocket"],
        [
            (
                "Is it day or night?",
                "Twilight. The sky is a deep blue that darkens toward the top, and the lights near the ground are "
                "already on.",
            ),
        ],
    ),
    (
        ["rocket_tall"],
        [
            (
                "Describe this image briefly.",
                "A tall, narrow view of a white rocket standing upright against a dark blue evening sky, with a "
                "bright light flaring near its base.",
            ),
        ],
    ),
    (
        ["horse"],
        [
            ("What is this?", "A black silhouette of a horse standing side-on, on a white background."),
            (
                "Which way is the horse facing?",
                "To the right. Its head is at the upper right and its tail hangs down on the left.",
            ),
        ],
    ),
    (
        ["horse"],
        [
            (
                "Is this a photograph?",
                "No. It is a flat black-and-white graphic, a silhouette with no texture or shading, like clip art.",
            ),
        ],
    ),
    (
        ["hubble_deep_field"],
        [
            (
                "What am I looking at?",
                "The Hubble eXtreme Deep Field, a very long exposure of a tiny patch of sky. Almost every dot and "
                "smudge in it is a distant galaxy.",
            ),
            (
                "Are there any stars?",
                "A few. The bright points with sharp cross-shaped diffraction spikes, such as the one right of centre, "
                "are stars in our own galaxy that lie in front of the field.",
            ),
        ],
    ),
    (
        ["hubble_deep_field"],
        [
            (
                "What colours appear in this image?",
                "Mostly black, with galaxies in white, blue, yellow, orange and red. Blue galaxies are forming new "
                "stars, while red and orange ones are full of older stars or very far away.",
            ),
        ],
    ),
    (
        ["retina"],
        [
            (
                "What kind of image is this?",
                "A fundus photograph: a picture of the back of the eye taken through the pupil. It shows a normal "
                "retina.",
            ),
            (
                "Where is the optic disc?",
                "On the left side. It is the bright yellowish circle where the blood vessels come together.",
            ),
        ],
    ),
    (
        ["retina"],
        [
            (
                "What is the darker spot in the middle?",
                "The macula, with the fovea at its centre. It looks darker because it is rich in pigment and has no "
                "large blood vessels.",
            ),
        ],
    ),
    (
        ["text"],
        [
            ("Is the writing printed or handwritten?", "Handwritten, in dark ink on ruled paper."),
            (
                "What subject does it look like?",
                "Mathematics: there are equations with equals signs, parentheses and variables such as s and t.",
            ),
        ],
    ),
    (
        ["camera"],
        [
            (
                "What is the man doing?",
                "He is filming: he leans forward to look through the viewfinder of a small video camera mounted on a "
                "tripod.",
            ),
            (
                "Where is he?",
                "Outdoors on a large grassy field. In the distance there are domed buildings and a tall tower under a "
                "clear sky.",
            ),
        ],
    ),
    (
        ["camera"],
        [
            ("Is this a colour photo?", "No, it is black and white."),
        ],
    ),
    (
        ["coins"],
        [
            ("How many coins are there?", "24, arranged in four rows of six."),
            (
                "What do the coins show?",
                "Most show a head in profile and a few show a standing or seated figure. They are ancient Greek "
                "coins photographed against a dark background.",
            ),
        ],
    ),
    (
        ["coins"],
        [
            (
                "Why would a simple threshold struggle to separate these coins from the background?",
                "The dark gray background shares many gray levels with the coins and the lighting is uneven, so no single "
                "brightness cut separates every coin cleanly.",
            ),
        ],
    ),
    (
        ["ihc"],
        [
            (
                "What does this microscope image show?",
                "A section of colon tissue stained by immunohistochemistry. Several glands made of tall cells are "
                "stained brown, and the pale tissue between them holds small blue nuclei.",
            ),
            (
                "What do the brown and blue colours mean?",
                "Brown is the DAB stain that marks where the target protein is present; blue is the hematoxylin "
                "counterstain that colours cell nuclei.",
            ),
        ],
    ),
    (
        ["cell"],
        [
            (
                "Describe this image.",
                "A grayscale microscopy image with a single round, bright cell to the right of centre. It has a dark "
                "halo around it and sits on a grainy gray background.",
            ),
            ("Is the cell in the centre of the frame?", "No. It is right of centre and slightly below the middle."),
        ],
    ),
    (
        ["brick"],
        [
            (
                "What surface is this?",
                "A brick wall. The bricks are long rectangles separated by light mortar lines, and the rows run "
                "vertically because the image is rotated.",
            ),
        ],
    ),
    (
        ["gravel"],
        [
            (
                "What is this a picture of?",
                "Gravel: a layer of small, sharp-edged stones of roughly equal size, seen from above in grayscale.",
            ),
        ],
    ),
    (
        ["grass"],
        [
            (
                "What texture is shown?",
                "Grass seen from above in grayscale: a tangle of thin blades with some small rounded leaves mixed in.",
            ),
        ],
    ),
    # Two images: comparisons.
    (
        ["chelsea", "horse"],
        [
            (
                "Which of the two images is a real photograph?",
                "The first. It is a close-up photo of a tabby cat, while the second is a flat black silhouette of a "
                "horse.",
            ),
            ("What animals are shown?", "A cat in the first image and a horse in the second."),
        ],
    ),
    (
        ["rocket", "astronaut"],
        [
            (
                "What do these two images have in common?",
                "Both are about spaceflight: the first shows a rocket on its launch pad at dusk and the second is a "
                "portrait of an astronaut in an orange spacesuit next to a Space Shuttle model.",
            ),
        ],
    ),
    (
        ["camera", "astronaut"],
        [
            (
                "Which image is in colour?",
                "The second. The astronaut portrait is in colour, while the man with the video camera is in black "
                "and white.",
            ),
            ("How many people are there in total?", "Two, one in each image."),
        ],
    ),
    (
        ["rocket", "rocket_tall"],
        [
            (
                "How are these two images related?",
                "The second is a narrow vertical crop of the first. Both show the same rocket on its pad at dusk, but "
                "the crop cuts away the towers on either side.",
            ),
        ],
    ),
    (
        ["gravel", "grass"],
        [
            ("Which image shows stones?", "The first. It shows loose gravel, while the second shows grass."),
        ],
    ),
    (
        ["hubble_deep_field", "retina"],
        [
            (
                "Which image was taken through a telescope and which shows a human eye?",
                "The first, the Hubble deep field full of galaxies, was taken by a space telescope. The second is a "
                "fundus photograph of the retina at the back of a human eye.",
            ),
        ],
    ),
    (
        ["coffee", "coins"],
        [
            (
                "Which image contains more objects?",
                "The second: it shows 24 coins, while the first shows a single espresso cup on a saucer with a spoon.",
            ),
        ],
    ),
    (
        ["ihc", "cell"],
        [
            (
                "Which image is in colour?",
                "The first, with brown and blue stained tissue. The second is a grayscale image of one round cell.",
            ),
            (
                "Which one shows more cells?",
                "The first: many cells packed into glands. The second shows just one cell.",
            ),
        ],
    ),
    # Two images, one per turn.
    (
        ["chelsea", "coffee"],
        [
            (f"{IMAGE_PLACEHOLDER}\nWhat is in this picture?", "A close-up of a tabby cat with yellow-green eyes."),
            (
                f"{IMAGE_PLACEHOLDER}\nAnd in this one?",
                "A cup of espresso on a red saucer with a spoon, on a wooden table.",
            ),
        ],
    ),
    # Text only.
    ([], [("What is the boiling point of water at sea level?", "100 degrees Celsius, or 212 degrees Fahrenheit.")]),
    ([], [("Name the three primary colours of light.", "Red, green and blue.")]),
    ([], [("What is 12 times 7?", "84."), ("And half of that?", "42.")]),
    (
        [],
        [
            (
                "Write one sentence describing a sunny beach.",
                "Golden sand stretches toward calm blue water under a bright, cloudless sky.",
            )
        ],
    ),
    ([], [("How many legs does a horse have?", "Four.")]),
    (
        [],
        [
            (
                "What does an astronaut wear during launch?",
                "A pressure suit with a helmet and gloves, which protects them if the cabin loses pressure.",
            ),
            ("What colour were the space shuttle launch suits?", "Bright orange, so crews were easy to spot."),
        ],
    ),
]


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def _write_images(images_dir: Path) -> None:
    from PIL import Image

    images_dir.mkdir(parents=True, exist_ok=True)
    for photo in _PHOTOS.values():
        img = Image.fromarray(_to_rgb(photo.load()))  # HxWx3 uint8 -> RGB
        if photo.file.endswith(".png"):
            img.save(images_dir / photo.file, format="PNG", **_PNG)
        else:
            img.save(images_dir / photo.file, format="JPEG", **_JPEG)
    lines = [
        "# Demo image licences",
        "",
        "All images come from scikit-image's bundled sample data (`skimage.data`, v0.26); the licence",
        "column quotes each function's docstring. `rocket_tall.jpg` is a crop of `rocket`; grayscale and",
        "binary images were converted to RGB.",
        "",
        "| file | skimage.data source | credit | licence |",
        "|---|---|---|---|",
    ]
    for photo in _PHOTOS.values():
        lines.append(f"| {photo.file} | `{photo.source}()` | {photo.credit} | {photo.licence} |")
    (images_dir / "LICENSES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _caption_records() -> list[dict]:
    return [
        {"id": f"cap-{name}-{k}", "image": _PHOTOS[name].file, "caption": caption}
        for name, captions in _CAPTIONS.items()
        for k, caption in enumerate(captions)
    ]


def _sft_records() -> list[dict]:
    records = []
    for i, (names, turns) in enumerate(_SFT):
        conversations = []
        for j, (question, answer) in enumerate(turns):
            if j == 0 and names and IMAGE_PLACEHOLDER not in question:
                # Multi-image prompts label each image, as InternVL's multi-image data does.
                prefix = (
                    f"{IMAGE_PLACEHOLDER}\n"
                    if len(names) == 1
                    else "".join(f"Image-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(len(names)))
                )
                question = prefix + question
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        n_placeholders = sum(c["value"].count(IMAGE_PLACEHOLDER) for c in conversations)
        if n_placeholders != len(names):  # authoring guard: the converter relies on this count
            raise AssertionError(f"SFT sample {i}: {n_placeholders} placeholders for {len(names)} images")
        record: dict = {"id": f"sft-{i:03d}", "conversations": conversations}
        if len(names) == 1:
            record["image"] = _PHOTOS[names[0]].file
        elif names:
            record["image"] = [_PHOTOS[n].file for n in names]
        records.append(record)
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")


def demo_texts() -> list[str]:
    """All caption and conversation text, conversations rendered as ChatML so the tokenizer learns
    the role names too (the special tokens themselves are excluded from BPE training)."""
    texts = [r["caption"] for r in _caption_records()]
    for r in _sft_records():
        roles = {"human": "user", "gpt": "assistant"}
        texts.append("".join(f"{IM_START}{roles[c['from']]}\n{c['value']}{IM_END}\n" for c in r["conversations"]))
    return texts


def write_demo_raw(out_dir: Path) -> DemoRawPaths:
    """Write images/ (+LICENSES.md), captions.jsonl, sft.jsonl and tokenizer/ under `out_dir`."""
    out_dir = Path(out_dir)
    paths = DemoRawPaths(
        images_dir=out_dir / "images",
        captions_jsonl=out_dir / "captions.jsonl",
        sft_jsonl=out_dir / "sft.jsonl",
        tokenizer_dir=out_dir / "tokenizer",
    )
    _write_images(paths.images_dir)
    _write_jsonl(paths.captions_jsonl, _caption_records())
    _write_jsonl(paths.sft_jsonl, _sft_records())
    build_demo_tokenizer(demo_texts(), paths.tokenizer_dir, vocab_size=DEMO_VOCAB_SIZE)
    return paths
