"""The whole composed config checked before any data is read: one line naming the key, the bad
value and the fix (a ``ConfigError``), instead of a traceback minutes later.

Two checks:

- **types**: every node with a ``_target_`` is matched against the annotations of what it
  builds (a class's ``__init__``, a function's signature): ``model.radius=eight`` against
  ``radius: int``. Only scalar values are checked, and only against plain annotations (int,
  float, bool, str, None, Literal and unions of them); anything richer is left to the target.
- **ranges**: the values whose bad range would otherwise surface late or never (``RANGES``):
  learning rates, Trainer limits, model sizes (models are built after the data is read).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any, Callable

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from saffu_lab.errors import ConfigError

_SCALARS = (bool, int, float, str, type(None))


def check_config(cfg: DictConfig) -> None:
    """The composed config (interpolations as the user wrote them: an error names the key that was
    given, ``model.radius``, not the ``data.framing.radius: ${model.radius}`` that copies it)."""
    _check_types(cfg, "")
    _check_ranges(OmegaConf.to_container(cfg, resolve=True))


# --- types -----------------------------------------------------------------------------------

def _check_types(node, path: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_target(node, path)
        for key in node.keys():
            if not OmegaConf.is_interpolation(node, key):  # checked where its value is given
                _check_types(node[key], f"{path}{key}.")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_interpolation(node, i):
                _check_types(node[i], f"{path}{i}.")


def _check_target(node: DictConfig, path: str) -> None:
    try:
        target = get_object(node["_target_"])
    except Exception:  # noqa: BLE001 - an unknown target is reported by instantiate, with its name
        return
    hints = _hints(target)
    for key in node.keys():
        if key.startswith("_") or key not in hints or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if not isinstance(value, _SCALARS):
            continue
        allowed = _accepts(hints[key], value)
        if allowed is not None:
            name = f"{path}{key}"
            owner = getattr(target, "__name__", str(target))
            raise ConfigError(f"{name}={value!r} is not {allowed} ({owner} takes {key}: {_show(hints[key])}); "
                              f"give e.g. {name}={_example(hints[key])}")


def _hints(target) -> dict:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - annotations naming types not importable here: read them raw
        return {k: p.annotation for k, p in inspect.signature(function).parameters.items()
                if p.annotation is not inspect.Parameter.empty and not isinstance(p.annotation, str)}


def _members(annotation) -> list | None:
    """The plain members of an annotation (a union flattened), or None if any is not plain."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(annotation):
            members = _members(arg)
            if members is None:
                return None
            out += members
        return out
    if origin is typing.Literal:
        return [("literal", typing.get_args(annotation))]
    if annotation in (int, float, bool, str, type(None)):
        return [annotation]
    return None


def _accepts(annotation, value) -> str | None:
    """None if ``value`` fits ``annotation`` (or the annotation is not plain); else what it should be."""
    members = _members(annotation)
    if members is None:
        return None
    for m in members:
        if isinstance(m, tuple) and value in m[1]:
            return None
        if m is type(None) and value is None:
            return None
        if m is bool and isinstance(value, bool):
            return None
        if m is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if m is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if m is str and isinstance(value, str):
            return None
    return " or ".join(_name(m) for m in members)


def _name(member) -> str:
    if isinstance(member, tuple):
        return "one of " + ", ".join(repr(v) for v in member[1])
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string", type(None): "null"}[member]


def _show(annotation) -> str:
    return " | ".join(_name(m) for m in _members(annotation))


def _example(annotation) -> str:
    m = [x for x in _members(annotation) if x is not type(None)][0]
    return {int: "8", float: "0.001", bool: "true", str: "NAME"}.get(m, repr(m[1][0]) if isinstance(m, tuple) else "VALUE")


# --- ranges ----------------------------------------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _nonnegative_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_int(v) -> bool:
    return _nonnegative_int(v) and v >= 1


def _batches_limit(v) -> bool:  # Lightning: a fraction of the batches, or a number of them
    return v is None or _nonnegative_int(v) or (_number(v) and 0.0 <= v <= 1.0)


def _val_interval(v) -> bool:
    return v is None or _positive_int(v) or (_number(v) and 0.0 < v <= 1.0)


# key -> (test, what it must be); a key absent from the config is not checked
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_nonnegative_int, "an integer >= 0"),
    "threads": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "regime.optimizer.lr": (_positive, "a learning rate > 0, e.g. 1e-3"),
    "regime.optimizer.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "trainer.max_steps": (lambda v: v == -1 or _positive_int(v), "-1 (no limit) or an integer >= 1"),
    "trainer.accumulate_grad_batches": (_positive_int, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0"),
    "trainer.limit_train_batches": (_batches_limit, "null, a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_val_batches": (_batches_limit, "null, a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_test_batches": (_batches_limit, "null, a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.val_check_interval": (_val_interval, "null, a fraction of an epoch in (0, 1] or a number of batches >= 1"),
    "trainer.log_every_n_steps": (_positive_int, "an integer >= 1"),
    "trainer.devices": (lambda v: v == "auto" or v == -1 or _positive_int(v) or isinstance(v, list), "an integer >= 1, -1 or auto"),
    "data.batch_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "data.eval_batch_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    **{f"model.{part}dropout": (lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)")
       for part in ("", "transformer.")},
    **{f"model.{k}": (_positive_int, "an integer >= 1") for k in (
        "radius", "block_size", "block_dim", "radial_dim", "hidden_dim", "d_model", "n_layer", "n_head", "context_length",
        # the residual SAFFU's two parts
        "saffu.radius", "saffu.block_size", "saffu.block_dim",
        "transformer.d_model", "transformer.n_layer", "transformer.n_head", "transformer.context_length")},
    **{f"model.{k}": (_nonnegative_int, "0 (a dense block decoder) or a rank >= 1") for k in ("block_rank", "saffu.block_rank")},
    "model.combine": (lambda v: v in ("sum", "mixture"), "sum (the experts' logits added) or mixture (their probabilities interpolated)"),
    "model.mix_init": (lambda v: _number(v) and 0 < v < 1, "a weight strictly between 0 and 1, e.g. 0.9"),
    "model.gpt_loss": (lambda v: _number(v) and v >= 0, "a weight >= 0 (0: the mixture's loss alone)"),
    "model.mix_gate_only": (lambda v: isinstance(v, bool), "true or false"),
    # last.ckpt is train.py's (resume.StopHandling, after every validation); Lightning's save_last
    # would write only beside a new best, and as last-v1.ckpt once ours exists
    "callbacks.model_checkpoint.save_last": (lambda v: v is None or v is False,
                                             "false: train.py writes last.ckpt itself, after every validation"),
    "trainer.enable_checkpointing": (lambda v: v is None or v is True,
                                     "true: every run keeps last.ckpt to resume from (callbacks.model_checkpoint=null "
                                     "drops the best-*.ckpt)"),
}


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _check_ranges(cfg: dict) -> None:
    for key, (test, must) in RANGES.items():
        value = _get(cfg, key)
        if value is not _MISSING and not test(value):
            raise ConfigError(f"{key}={value!r} must be {must}")
    module_lr = _get(cfg, "regime.module_lr")
    if isinstance(module_lr, dict):
        for name, lr in module_lr.items():
            if not _positive(lr):
                raise ConfigError(f"regime.module_lr.{name}={lr!r} must be a learning rate > 0, e.g. 1e-3")
    regime = _get(cfg, "regime.regime")
    epochs, steps = _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_steps")
    if regime not in (_MISSING, "explicit") and epochs is not _MISSING:
        bounded = _positive_int(steps) or _get(cfg, "trainer.max_time") not in (None, _MISSING)
        if not (_positive_int(epochs) or (epochs == -1 and bounded)):
            raise ConfigError(f"trainer.max_epochs={epochs!r} trains nothing with regime={regime} (backprop); give "
                              "trainer.max_epochs=N >= 1 (or -1 with trainer.max_steps or trainer.max_time), "
                              "or regime=explicit for the solve alone")
