"""Every setting once: dataclass fields that carry their help text and bounds.

A field is declared with :func:`setting`; the dataclass checks its fields against those bounds
in ``__post_init__`` (:func:`check`). The CLI (:class:`SettingsParser`, a thin
``transformers.HfArgumentParser``), the Gradio controls and the notebook widgets read the same
metadata through :func:`spec`, so a new setting is one field that every front end shows.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import ModelLoadError, SettingsError

#: The training method every front end starts with (a name in ``d3po_core.objectives.METHODS``),
#: chosen on the taste benchmark (docs/benchmarks.md §5).
DEFAULT_METHOD = "kto"

MAX_PROMPT_CHARS = 2000
"""The longest prompt the studio, the CLI and the session accept (CLIP reads the first 77
tokens; the rest is kept with the grid)."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    step: float | None = None,
    label: str | None = None,
    aliases: tuple[str, ...] = (),
    cli: bool = True,
    none: str = "off",
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text and bounds.

    low/high: inclusive bounds (``low_open`` makes ``low`` exclusive); step: the studio's
    slider step; label: the name shown in the studio (default: the field name in words);
    aliases: extra CLI flags; cli=False keeps a field off the command line (nested settings);
    none: the word the studio shows for None in an optional number ("off" or "auto").
    """
    metadata = {
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "step": step,
        "label": label,
        "aliases": list(aliases),
        "cli": cli,
        "none": none,
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Spec:
    """What a front end needs to show one setting."""

    name: str
    kind: str  # "bool", "int", "float", "str", "choice", "list"
    default: Any
    help: str
    label: str
    low: float | None
    high: float | None
    low_open: bool
    step: float | None
    choices: tuple | None
    optional: bool  # None is allowed (and means "off" or "automatic")
    none: str = "off"  # the word for None ("off" or "auto")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def spec(cls: type, name: str) -> Spec:
    """The declaration of one setting of a settings dataclass."""
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None:
        raise KeyError(f"{cls.__name__} has no setting {name!r}")
    hint, optional = _unwrap_optional(_hints(cls)[name])
    choices = None
    if typing.get_origin(hint) is Literal:
        kind, choices = "choice", typing.get_args(hint)
    elif typing.get_origin(hint) is list:
        kind = "list"
    else:
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, "other")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None  # required
    meta = f.metadata
    return Spec(
        name=name,
        kind=kind,
        default=default,
        help=meta.get("help", ""),
        label=meta.get("label") or name.replace("_", " "),
        low=meta.get("low"),
        high=meta.get("high"),
        low_open=meta.get("low_open", False),
        step=meta.get("step"),
        choices=choices,
        optional=optional,
        none=meta.get("none", "off"),
    )


def specs(cls: type) -> list[Spec]:
    """Every setting of a settings dataclass, in declaration order."""
    return [spec(cls, f.name) for f in fields(cls)]


def _bounds_text(s: Spec) -> str:
    if s.low is not None and s.high is not None and not s.low_open:
        return f"between {s.low:g} and {s.high:g}"
    low = f"{'>' if s.low_open else '≥'} {s.low:g}" if s.low is not None else ""
    high = f"≤ {s.high:g}" if s.high is not None else ""
    return " and ".join(t for t in (low, high) if t)


def check_value(s: Spec, value: Any) -> None:
    """Raise :class:`SettingsError` if ``value`` is not allowed by the setting's declaration."""
    if value is None and s.optional:
        return
    if s.kind == "choice":
        if value not in s.choices:
            options = ", ".join(repr(c) for c in s.choices)
            raise SettingsError(f"{s.name} must be one of {options}, not {value!r}")
        return
    if s.kind in ("int", "float"):
        number = (int,) if s.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            raise SettingsError(f"{s.name} must be a number, not {value!r}")
        too_low = s.low is not None and (value <= s.low if s.low_open else value < s.low)
        too_high = s.high is not None and value > s.high
        if too_low or too_high or value != value:
            raise SettingsError(f"{s.label} must be {_bounds_text(s)}, not {value}")
    elif s.kind == "bool" and not isinstance(value, bool):
        raise SettingsError(f"{s.name} must be true or false, not {value!r}")
    elif s.kind == "str" and not isinstance(value, str):
        raise SettingsError(f"{s.name} must be text, not {type(value).__name__}")


def check(obj: Any) -> None:
    """Check every field of a settings dataclass against its declaration."""
    for s in specs(type(obj)):
        check_value(s, getattr(obj, s.name))


def check_prompt(text: Any, what: str = "prompt") -> str:
    """The prompt, stripped; raises :class:`SettingsError` if empty, not text or too long."""
    if not isinstance(text, str):
        raise SettingsError(f"{what} must be text, not {type(text).__name__}")
    text = text.strip()
    if not text:
        raise SettingsError(f"the {what} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise SettingsError(f"the {what} is too long ({len(text)} > {MAX_PROMPT_CHARS} characters)")
    return text


class Settings:
    """Base of the settings dataclasses: bounds checked on construction, dict round trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; subclasses add checks that involve several fields."""
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a stored dict, ignoring keys that are not settings (e.g. a method tag)."""
        data = dict(data)
        nested = {}
        for f in fields(cls):
            sub = _hints(cls)[f.name]
            if dataclasses.is_dataclass(sub) and isinstance(data.get(f.name), dict):
                nested[f.name] = sub.from_dict(data.pop(f.name))
        known = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        return cls(**known, **nested)


@dataclass
class LoraSettings(Settings):
    """The LoRA adapter on the UNet's attention projections."""

    rank: int = setting(
        4, low=1, high=256, help="Adapter rank; 4 is enough for preference tuning and is fast."
    )
    alpha: float = setting(
        4.0, low=0, low_open=True, help="Scale numerator (scale = alpha / rank); equal to rank: 1."
    )
    targets: list[str] = setting(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        help="UNet module names that get adapters (the attention projections).",
    )
    dora: bool = setting(
        False,
        help="DoRA (Liu et al. 2024): each adapted weight's magnitude learned apart from its "
        "direction; exports in diffusers' format only (no kohya file).",
    )


@dataclass
class SampleSettings(Settings):
    """How a grid is sampled."""

    n: int = setting(
        4,
        low=2,
        high=16,
        label="grid size",
        aliases=("--grid-size",),
        help="Images a grid, sampled as one batch.",
    )
    steps: int = setting(
        20, low=1, high=1000, help="DDIM steps; 20 keeps a grid quick and a trajectory short."
    )
    guidance: float = setting(
        7.5,
        low=0,
        high=30,
        step=0.5,
        help="Classifier-free guidance scale (≤ 1 turns guidance off); "
        "the model's recommendation when it has one.",
    )
    eta: float = setting(
        1.0,
        low=0,
        high=1,
        step=0.05,
        help="DDIM η: must be > 0 for the log-probs a round trains on (1 = DDPM-like noise).",
    )
    shared_noise: bool = setting(
        False,
        help="One initial noise for the whole grid (the D3PO authors' setting); off: one per "
        "image, which differed more and learned most in bench/ablation.py.",
    )
    negative_prompt: str = setting("", help="What the images should not show.")
    strength: float = setting(
        1.25,
        low=0,
        high=3,
        step=0.05,
        label="adapter strength",
        aliases=("--adapter-strength",),
        help="The tuned adapter's weight while sampling: 0 draws as the base model, 1 as "
        "trained, above 1 further the way the picks asked (1.25 learned the benchmark's "
        "tastes a little better than 1 over 12 seeds, level on the 6 it was not chosen on). "
        "The studio exports the adapter at this strength.",
    )
    height: int | None = setting(
        None, low=8, high=4096, help="Image height in pixels; none: the model's size."
    )
    width: int | None = setting(
        None, low=8, high=4096, help="Image width in pixels; none: the model's size."
    )

    def validate(self) -> None:
        super().validate()
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise SettingsError(f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters")


Precision = Literal["no", "fp16", "bf16"]
Checkpointing = Literal["auto", "on", "off"]


@dataclass
class RoundSettings(Settings):
    """What every objective's round takes: the loop's settings and the adapter."""

    method: ClassVar[str] = ""  # the registered method a subclass configures

    learning_rate: float = setting(
        1e-3, low=0, low_open=True, high=1, aliases=("--lr",), help="AdamW step size of the LoRA."
    )
    epochs: int = setting(2, low=1, high=100, help="Passes over the round's items.")
    batch_size: int = setting(8, low=1, high=4096, help="Items a UNet call.")
    grad_accum: int = setting(
        1, low=1, high=1024, help="UNet calls an optimizer step (gradient accumulation)."
    )
    max_grad_norm: float = setting(
        1.0, low=0, low_open=True, help="Gradient clipping norm of an optimizer step."
    )
    lr_schedule: Literal["constant", "cosine"] = setting(
        "constant",
        help="How the step size runs over a round: constant, or cosine (diffusers' schedule: "
        "up from 0 over the first tenth of the optimizer steps, then down to 0 at the "
        "round's end, so its last steps move the adapter least). On the taste benchmark it "
        "learned less at the same peak and drifted more at twice it (docs/benchmarks.md §5).",
    )
    ema_decay: float | None = setting(
        None,
        low=0,
        high=0.9999,
        help="Keep an exponential moving average of the adapter's weights over the round's "
        "optimizer steps (diffusers' EMAModel, with its warm-up) and end the round on it: "
        "the last steps' noise averaged out; none: off, the last step's weights. At 0.95 it "
        "learned as much on the taste benchmark and drifted more under random picks "
        "(docs/benchmarks.md §5).",
    )
    timestep_fraction: float = setting(
        1.0,
        low=0,
        low_open=True,
        high=1,
        step=0.05,
        help="Share of the denoising steps trained per item, drawn at random.",
    )
    mixed_precision: Precision | None = setting(
        None, help="accelerate's precision: no, fp16 or bf16; none: the UNet's dtype."
    )
    gradient_checkpointing: Checkpointing = setting(
        "auto",
        help="Recompute activations in the backward pass to save memory; auto: on when it "
        "saves ≥ 1 GiB or lets the batch fit (off for small models and on CPU).",
    )
    micro_batch: int | None = setting(
        None,
        low=1,
        high=4096,
        none="auto",
        help="Items a UNet call; a batch is split and its gradients added, so results do not "
        "change; auto: the largest that fits the memory.",
    )
    max_memory_gb: float | None = setting(
        None,
        low=0,
        low_open=True,
        high=4096,
        none="auto",
        help="Peak memory a round may use, in GiB (e.g. 7 on an 8 GB card that also drives a "
        "display); auto: what the device has free (no limit on CPU).",
    )
    seed: int = setting(
        0,
        low=0,
        aliases=("--train-seed",),
        help="Seeds the item order, the steps or noise levels drawn, and a first "
        "round's adapter weights: the same picks and settings train the same adapter.",
    )
    lora: LoraSettings = setting(
        default_factory=LoraSettings, cli=False, help="The adapter a first round adds."
    )

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):  # the earlier on/off setting
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        super().__post_init__()

    @property
    def checkpointing(self) -> bool | None:
        """gradient_checkpointing as the memory plan takes it (None: automatic)."""
        return {"on": True, "off": False}.get(self.gradient_checkpointing)

    def to_dict(self) -> dict:
        """The settings, tagged with their method, as a round stores them."""
        return {"method": self.method, **super().to_dict()}


@dataclass
class SessionArgs(Settings):
    """Session (every command line: the engine's and the studio's)"""

    session: str = setting(
        str(Path("sessions") / "default"), help="Session folder (created if new)."
    )


@dataclass
class ModelArgs(Settings):
    """Model (every command line that loads one)"""

    model: str | None = setting(None, help="Diffusers folder or hub id; none: the embedded model.")
    device: str | None = setting(None, help="cuda, cpu, …; none: automatic.")


EMBEDDED_MODEL = Path(__file__).parent / "embedded" / "model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def model_folder(model: str | Path | None) -> Path | None:
    """The local diffusers folder that ``--model`` names (None: the embedded model), checked
    to exist and to hold a model_index.json; None for a hub id (checked as it loads). Cheap:
    a front end checks it before anything heavy loads."""
    if model is None:
        if not (EMBEDDED_MODEL / "model_index.json").is_file():
            raise ModelLoadError(
                f"no model given and the embedded model is missing at {EMBEDDED_MODEL}; "
                "pass --model PATH|ID"
            )
        return EMBEDDED_MODEL
    path = Path(model).expanduser()
    if not path.exists() and looks_like_hub_id(str(model)):
        return None
    if not path.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    return path


class SettingsParser:
    """The command line of a tuple of settings dataclasses (``transformers.HfArgumentParser``).

    Flags come from the fields (``--learning_rate`` and ``--learning-rate``, plus aliases),
    help from their metadata; ``cli=False`` fields stay off. Parsing returns one instance per
    dataclass, each checked against its bounds.
    """

    def __init__(self, dataclass_types: tuple[type, ...], **kwargs: Any) -> None:
        from transformers import HfArgumentParser

        self.types = dataclass_types
        self.parser = HfArgumentParser([_cli_view(t) for t in dataclass_types], **kwargs)

    def given(self, argv: list[str]) -> set[str]:
        """The settings the command line sets explicitly (others keep their defaults)."""
        return {
            action.dest
            for action in self.parser._actions
            for option in action.option_strings
            if any(arg == option or arg.startswith(option + "=") for arg in argv)
        }

    def parse(self, argv: list[str]) -> tuple:
        values = vars(self.parser.parse_args(argv))
        return tuple(
            t(**{f.name: values[f.name] for f in fields(t) if f.metadata.get("cli", True)})
            for t in self.types
        )


@functools.cache
def _cli_view(cls: type) -> type:
    """A plain copy of a settings dataclass as HfArgumentParser reads it: only CLI fields,
    their help with default and bounds, no checks."""
    hints = _hints(cls)
    plain = []
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        meta = {"help": _cli_help(spec(cls, f.name)), "aliases": list(f.metadata["aliases"])}
        if f.default_factory is dataclasses.MISSING:
            plain.append((f.name, hints[f.name], field(default=f.default, metadata=meta)))
        else:
            plain.append(
                (f.name, hints[f.name], field(default_factory=f.default_factory, metadata=meta))
            )
    view = dataclasses.make_dataclass(cls.__name__, plain)
    view._argument_group_name = (cls.__doc__ or cls.__name__).splitlines()[0].rstrip(".")
    return view


def _cli_help(s: Spec) -> str:
    bounds = _bounds_text(s)
    return (f"{s.help} ({bounds})" if bounds else s.help).replace("%", "%%")
