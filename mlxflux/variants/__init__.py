"""FLUX.1's variants: one table entry each, one module per family of inputs.

    dev, schnell    text (and image to image from any init image)        base.TEXT
    kontext         reference images as appended tokens                   kontext.py
    canny, depth    a control image's latents on the input channels       control.py
    fill            the masked picture and its mask on the input channels fill.py

Every variant runs the same stages; a family says which inputs it takes, how it checks them,
how the encode stage turns them into a `Conditioning`, and what the PNG and ComfyUI graph
record. Adding a variant is its family module (or an existing family) plus one entry in
`VARIANTS` (docs/design.md, "Adding a variant").
"""

from ..errors import ModelFolderError
from ..sampling import DEFAULT_SHIFT
from .base import TEXT, Conditioning, Family, Inputs, Variant
from .control import CONTROL
from .fill import FILL
from .kontext import KONTEXT

__all__ = ["FAMILIES", "VARIANTS", "Conditioning", "Family", "Inputs", "Variant",
           "check_variant", "infer_variant", "variant_of"]  # fmt: skip

# every family of inputs, in the order a request's inputs are checked
FAMILIES: tuple[Family, ...] = (TEXT, KONTEXT, CONTROL, FILL)

# Guidance: BFL's and ComfyUI's examples (Kontext 2.5, BFL cli_kontext and ComfyUI's template;
# Canny 30 and Depth 10, BFL cli_control and diffusers' FluxControlPipeline examples; Fill 30,
# BFL cli_fill and ComfyUI's Fill example). Steps and shift: ComfyUI's (20 at a fixed 1.15).
VARIANTS = {
    v.name: v
    for v in (
        Variant("dev", "flux1-dev", "FLUX.1 dev", 20, DEFAULT_SHIFT, 3.5),
        # ComfyUI's schnell: ModelSamplingFlux at shift 1; no guidance input (any value works)
        Variant("schnell", "flux1-schnell", "FLUX.1 schnell", 4, 1.0, 3.5, guided=False),
        Variant("kontext", "flux1-kontext-dev", "FLUX.1 Kontext dev", 20, DEFAULT_SHIFT, 2.5,
                family=KONTEXT, own_guidance=True),
        Variant("canny", "flux1-canny-dev", "FLUX.1 Canny dev", 20, DEFAULT_SHIFT, 30.0,
                in_channels=128, family=CONTROL, own_guidance=True),
        Variant("depth", "flux1-depth-dev", "FLUX.1 Depth dev", 20, DEFAULT_SHIFT, 10.0,
                in_channels=128, family=CONTROL, own_guidance=True),
        Variant("fill", "flux1-fill-dev", "FLUX.1 Fill dev", 20, DEFAULT_SHIFT, 30.0,
                in_channels=384, family=FILL, own_guidance=True),
    )
}  # fmt: skip


def variant_of(manifest: dict) -> Variant:
    """A model folder's variant: recorded at conversion, or (older folders) from its config."""
    name = manifest.get("variant")
    if name is None:
        guided = manifest["components"]["transformer"]["config"].get("guidance_embed", True)
        name = "dev" if guided else "schnell"
    if name not in VARIANTS:
        raise ModelFolderError(
            f"mlxflux.json: variant {str(name)!r} is not one this mlxflux runs "
            f"({', '.join(VARIANTS)}); a newer mlxflux may"
        )
    return VARIANTS[name]


def check_variant(name: str, config: dict) -> None:
    """Refuse a variant the transformer's shapes contradict (ValueError, one line)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    guided = config.get("guidance_embed", True)
    if v.guided != guided:
        has = "has" if guided else "has no"
        raise ValueError(f"the transformer {has} a guidance embedding: it is not {v.title}")
    width = config.get("in_channels", 64)
    if width != v.in_channels:
        raise ValueError(f"the transformer takes {width} input channels, {v.title} {v.in_channels}")


def infer_variant(config: dict, names) -> tuple[str, str | None]:
    """(variant, a note when a name decided it) from the transformer's config and the names of
    its sources (files, folders, a repo id, a diffusers pipeline class): the input width and
    the guidance embedding decide where they can; Kontext has dev's shapes and Canny Depth's,
    so there a name containing the variant's name decides. ValueError when nothing does."""
    width, guided = config.get("in_channels", 64), config.get("guidance_embed", True)
    fits = [v for v in VARIANTS.values() if v.in_channels == width and v.guided == guided]
    if not fits:
        raise ValueError(
            f"a transformer with {width} input channels is no FLUX.1 model mlxflux knows "
            "(dev, schnell and Kontext take 64, Canny and Depth 128, Fill 384)"
        )
    names = [str(n) for n in names if n]
    candidates = fits[1:] if fits[0].name == "dev" else fits  # dev is the 64-channel default
    for v in candidates:
        for text in names:
            if v.name in text.lower():
                note = f"variant {v.name}: suggested by {text}"
                if v.in_channels == 64:
                    note += " (its shapes are FLUX.1 dev's); pass --variant dev if it is not"
                elif len(fits) > 1:
                    note += f" (the shapes fit {' and '.join(f.title for f in fits)})"
                return v.name, note
    if len(fits) > 1 and fits[0].name != "dev":
        raise ValueError(
            f"{' and '.join(v.title for v in fits)} have the same shapes and no file name says "
            f"which this is: pass --variant {' or --variant '.join(v.name for v in fits)}"
        )
    return fits[0].name, None


def open_inputs(variant: Variant, request) -> Inputs:
    """The inputs of `request` that `variant`'s family takes, checked; a request giving another
    family's inputs is refused (SettingsError naming the field), before any stage."""
    own = None
    for family in FAMILIES:
        if family is variant.family:
            own = family.open(variant, request, request.init_image)
        elif family.given(request):
            raise family.refuse(variant, request)
    return own
