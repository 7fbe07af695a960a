"""One canonical name per generator, whatever folder of a benchmark a source points at.

GenImage nests each generator twice (``stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/{train,val}/...``) and
UniversalFakeDetect spells some sets its own way (``seeingdark`` is the SITD set). Tables, validation metrics and
``subsets:`` filters must agree on one name, so every known folder name maps to the canonical name below
(case-insensitively). Folder names not in the table are kept as they are. Which folder gives a file's subset is the
layout's rule (``pipelines.sources``).

UFD's diffusion test sets ship fake images only; ``UFD_REAL_PAIRS`` names the real-only set the benchmark scores each
of them with (UnivFD's ``dataset_paths.py``: guided with ImageNet, the LDM / Glide / DALL-E sets with LAION).
"""

from __future__ import annotations

# canonical name -> the folder names that mean it (the canonical name itself always does)
GENERATOR_ALIASES: dict[str, tuple[str, ...]] = {
    # GenImage: the generator folder and the folder inside it
    "midjourney": ("Midjourney", "imagenet_midjourney"),
    "sdv14": ("stable_diffusion_v_1_4", "imagenet_ai_0419_sdv4"),
    "sdv15": ("stable_diffusion_v_1_5", "imagenet_ai_0424_sdv5"),
    "adm": ("ADM", "imagenet_ai_0508_adm"),
    "glide": ("imagenet_glide",),
    "wukong": ("imagenet_ai_0424_wukong",),
    "vqdm": ("VQDM", "imagenet_ai_0419_vqdm"),
    # also UFD's biggan: the same generator, but another test set (one evaluation refuses to pool the two)
    "biggan": ("BigGAN", "imagenet_ai_0419_biggan"),
    # UniversalFakeDetect (CNNSpot's GAN sets, then UnivFD's diffusion sets and their real sets)
    "progan": ("progan_train", "progan_val"),
    "stylegan": (),
    "stylegan2": (),
    "cyclegan": (),
    "stargan": (),
    "gaugan": (),
    "deepfake": (),
    "sitd": ("seeingdark",),
    "san": (),
    "crn": (),
    "imle": (),
    "whichfaceisreal": (),
    "guided": (),
    "ldm_200": (),
    "ldm_200_cfg": (),
    "ldm_100": (),
    "glide_100_27": (),
    "glide_50_27": (),
    "glide_100_10": (),
    "dalle": (),
    "laion": (),
    "imagenet": (),
}

_CANONICAL_BY_FOLDER = {alias.lower(): canonical for canonical, aliases in GENERATOR_ALIASES.items()
                        for alias in (canonical, *aliases)}

UFD_REAL_PAIRS: dict[str, str] = {
    "guided": "imagenet",
    **{name: "laion" for name in ("ldm_200", "ldm_200_cfg", "ldm_100", "glide_100_27", "glide_50_27",
                                  "glide_100_10", "dalle")},
}

# Object-category folders UFD puts between a generator and its 0_real/1_fake folders (ProGAN's 20 LSUN classes and
# the categories of the StyleGAN / StyleGAN2 / CycleGAN sets): never a generator's name.
UFD_OBJECT_CLASSES = frozenset({
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    "bedroom", "church", "apple", "orange", "summer", "winter", "zebra",
})


def canonical_subset(name: str) -> str:
    """The canonical name of a known folder name or alias (any case); any other name unchanged."""
    return _CANONICAL_BY_FOLDER.get(name.lower(), name)
