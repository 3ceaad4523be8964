"""Settings controls derived from the engine's declarations (``d3po_core.settings``).

A control's kind, bounds, step, choices, label and help all come from the field's
declaration; this module only says which fields the studio shows (in the main row or under
"Advanced"/"Sampling") and which it leaves at their default on purpose, and why. The Gradio
app and the notebook panels build their controls from the same lists.

Fields are named by path from a root settings class: ``"beta"`` or ``"lora.rank"`` of
:class:`D3POConfig`, ``"steps"`` of :class:`SampleSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from d3po_core import settings
from d3po_core.errors import SettingsError
from d3po_core.methods import D3POConfig, DiffusionDPOConfig, DiffusionKTOConfig
from d3po_core.settings import SampleSettings, Spec, spec

# -- which fields the studio shows ------------------------------------------------------------

_LOOP_ADVANCED = (
    "batch_size",
    "grad_accum",
    "max_grad_norm",
    "lr_schedule",
    "ema_decay",
    "mixed_precision",
    "gradient_checkpointing",
    "micro_batch",
    "max_memory_gb",
    "lora.rank",
    "lora.alpha",
)
_LOOP_HIDDEN = {
    "seed": "fixes the order of a round's items for reproducible benchmarks (the CLI's "
    "--train-seed); picking it by hand changes nothing a labeler can judge",
    "lora.targets": "UNet module names: a wrong one fails the round, and only the first round "
    "of a session reads it",
    "mirror": "a CLI option (--mirror): twin adapters on the picks and on the picks swapped, "
    "at twice a round's training time; on the taste benchmark random picks moved shapes less "
    "(top-left 0.44 against 0.39 over the same 12 seeds) and every taste learned less "
    "(docs/benchmarks.md §5)",
    "ensemble": "a CLI option (--ensemble K): K adapters on the same picks, each from its own "
    "seed; 3 learned the tastes as 1 did, at 2.3 times a round's training time "
    "(docs/benchmarks.md §5)",
    "fresh_draws": "a benchmark option: drawing each round's noise levels and batch order "
    "afresh learned as the default did (docs/benchmarks.md §5)",
    "lora.dora": "a CLI option: DoRA learned the tastes as LoRA did over two machines "
    "(docs/benchmarks.md §5), and a DoRA adapter has no kohya export, which the studio offers",
}
#: why a loss on fresh noise levels of the final images hides the recorded steps' fraction
_NOISE_LEVELS_HIDDEN = {
    "timestep_fraction": "the loss trains fresh noise levels of the final images (noise "
    "draws), not the recorded denoising steps",
}
#: KTO's benchmark options: each measured on the taste benchmark and left at its default
_KTO_HIDDEN = {
    "undesirable_weight": "a benchmark option: at half weight on the worst images every taste "
    "learned less (docs/benchmarks.md §5)",
    "pair_noise": "a benchmark option: sharing a pick's noise levels learned less and drifted "
    "more under random picks (docs/benchmarks.md §5)",
    "noise_levels": "a benchmark option: stratified noise levels learned as much as random "
    "ones (docs/benchmarks.md §5)",
    "guided_loss": "a benchmark option: judging images by the guided prediction learned less, "
    "at twice the UNet rows (docs/benchmarks.md §5)",
    "preserve": "a benchmark option: prior preservation on the unlabeled images of each grid, "
    "measured against the drift of random picks (docs/benchmarks.md §5)",
    "preserve_from": "a benchmark option: the noise levels prior preservation applies at",
    "replay_spread": "a benchmark option: every earlier pick replayed, each on a share of the "
    "noise draws, instead of a random draw of them; it learned less (docs/benchmarks.md §5)",
}
_PREFERENCE_HIDDEN = {
    **_LOOP_HIDDEN,
    "anchor_scope": "a benchmark option: anchoring the pair as a whole learned as little as "
    "anchoring each image (docs/benchmarks.md §5)",
}


@dataclass(frozen=True)
class TrainForm:
    """A training method's controls: its settings class, the fields in the main row, those
    under "Advanced", and those left at their default on purpose (with the reason)."""

    root: type
    main: tuple[str, ...]
    advanced: tuple[str, ...]
    hidden: dict[str, str]

    @property
    def shown(self) -> tuple[str, ...]:
        return self.main + self.advanced


#: The methods on picks the studio trains, by registered name (D3PO, the project's own, first).
TRAIN_FORMS: dict[str, TrainForm] = {
    "d3po": TrainForm(
        D3POConfig,
        ("beta", "learning_rate", "epochs", "pairs", "reduction", "reference", "timestep_fraction"),
        ("replay", "ratio_clip", "anchor", *_LOOP_ADVANCED),
        _PREFERENCE_HIDDEN,
    ),
    "diffusion-dpo": TrainForm(
        DiffusionDPOConfig,
        ("beta", "learning_rate", "epochs", "pairs", "replay", "noise_draws"),
        ("anchor", "timestep_bias", *_LOOP_ADVANCED),
        {**_PREFERENCE_HIDDEN, **_NOISE_LEVELS_HIDDEN},
    ),
    "kto": TrainForm(
        DiffusionKTOConfig,
        ("beta", "learning_rate", "epochs", "replay", "noise_draws"),
        ("reference", "reference_point", *_LOOP_ADVANCED),
        {**_LOOP_HIDDEN, **_NOISE_LEVELS_HIDDEN, **_KTO_HIDDEN},
    ),
}
DEFAULT_METHOD = settings.DEFAULT_METHOD
TRAIN_ROOT = TRAIN_FORMS[DEFAULT_METHOD].root
TRAIN_MAIN = TRAIN_FORMS[DEFAULT_METHOD].main
TRAIN_ADVANCED = TRAIN_FORMS[DEFAULT_METHOD].advanced
TRAIN_HIDDEN = TRAIN_FORMS[DEFAULT_METHOD].hidden

LABEL_MAIN = ("n",)
SAMPLING = ("steps", "guidance", "eta", "shared_noise", "negative_prompt", "strength")
SAMPLING_HIDDEN = {
    "height": "the model's own size: other sizes sample worse, and a round trains grids of "
    "one latent size only",
    "width": "the model's own size: other sizes sample worse, and a round trains grids of "
    "one latent size only",
}

SAMPLE_ROOT = SampleSettings
NONE_CHOICE = "auto"  # an optional choice left to the engine (e.g. mixed precision)
NONE_NUMBER = "off"  # an optional number that is not applied (e.g. ratio clipping)


def field_spec(root: type, path: str) -> Spec:
    """The declaration of a field by its path from a root settings class."""
    *parents, name = path.split(".")
    cls = root
    for parent in parents:
        cls = type(spec(cls, parent).default)
    return spec(cls, name)


def _is_slider(s: Spec) -> bool:
    bounded = s.low is not None and s.high is not None and not s.optional
    return bounded and (s.kind == "int" or s.step is not None)


def _step(s: Spec) -> float:
    return s.step if s.step is not None else 1


# -- Gradio -----------------------------------------------------------------------------------


def gradio_control(root: type, path: str, value: Any = None, **kwargs: Any):
    """The Gradio input for one setting: label, help, bounds and choices from its declaration.

    choice → Radio (Dropdown with "auto" when optional); bool → Checkbox; a number with both
    bounds → Slider; an optional number → Textbox, empty: "off" or "auto" (Gradio's Number shows and
    sends 0 for an empty value); another number → Number; text → Textbox.
    """
    import gradio as gr

    s = field_spec(root, path)
    value = s.default if value is None else value
    common = {"label": s.label, "info": s.help, **kwargs}
    if s.kind == "choice" and s.optional:
        choices = [NONE_CHOICE, *s.choices]
        return gr.Dropdown(choices, value=NONE_CHOICE if value is None else value, **common)
    if s.kind == "choice":
        return gr.Radio(list(s.choices), value=value, **common)
    if s.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if s.kind in ("int", "float") and _is_slider(s):
        return gr.Slider(s.low, s.high, value=value, step=_step(s), **common)
    if s.kind in ("int", "float") and s.optional:
        text = "" if value is None else str(value)
        return gr.Textbox(value=text, placeholder=s.none, **common)
    if s.kind in ("int", "float"):
        return gr.Number(
            value=value,
            minimum=None if s.low_open else s.low,
            maximum=s.high,
            precision=0 if s.kind == "int" else None,
            **common,
        )
    if s.kind == "str":
        return gr.Textbox(value=value, **common)
    raise TypeError(f"the studio has no control for {path} ({s.kind})")


# -- ipywidgets -------------------------------------------------------------------------------


def widget(root: type, path: str, value: Any = None):
    """The ipywidgets input for one setting, built by the same rules as :func:`gradio_control`.

    The help is the widget's tooltip; an optional number is a text box (empty: "off").
    """
    import ipywidgets as widgets

    s = field_spec(root, path)
    value = s.default if value is None else value
    common = {
        "description": s.label,
        "tooltip": s.help,
        "style": {"description_width": "initial"},
    }
    if s.kind == "choice":
        options = [(NONE_CHOICE, None)] if s.optional else []
        options += [(str(c), c) for c in s.choices]
        return widgets.Dropdown(options=options, value=value, **common)
    if s.kind == "bool":
        return widgets.Checkbox(value=value, indent=False, **common)
    if s.kind == "int" and _is_slider(s):
        return widgets.IntSlider(value=value, min=s.low, max=s.high, step=_step(s), **common)
    if s.kind == "float" and _is_slider(s):
        return widgets.FloatSlider(value=value, min=s.low, max=s.high, step=_step(s), **common)
    if s.optional and s.kind in ("int", "float"):
        text = "" if value is None else str(value)
        return widgets.Text(value=text, placeholder=s.none, **common)
    if s.kind == "int":
        return widgets.IntText(value=value, **common)
    if s.kind == "float":
        return widgets.FloatText(value=value, **common)
    if s.kind == "str":
        return widgets.Text(value=value, **common)
    raise TypeError(f"the studio has no widget for {path} ({s.kind})")


# -- from controls back to settings -----------------------------------------------------------


def setting_value(s: Spec, raw: Any) -> Any:
    """A control's value as the setting's type ("auto", "off" and empty are None)."""
    if s.optional and (raw is None or raw in ("", NONE_CHOICE, NONE_NUMBER, s.none)):
        return None
    if s.kind in ("int", "float"):
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{s.label} must be a number, not {raw!r}") from None
        if s.kind == "int" and number.is_integer():
            return int(number)
        return number
    return raw


def settings_from(base, values: Mapping[str, Any]):
    """``base`` with the controls' values (keyed by path); checked against the declarations.

    Raises :class:`SettingsError` for a value out of its bounds.
    """
    root = type(base)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, raw in values.items():
        value = setting_value(field_spec(root, path), raw)
        parent, _, name = path.rpartition(".")
        if parent:
            nested.setdefault(parent, {})[name] = value
        else:
            top[name] = value
    for parent, changes in nested.items():
        top[parent] = dataclasses.replace(getattr(base, parent), **changes)
    return dataclasses.replace(base, **top)
