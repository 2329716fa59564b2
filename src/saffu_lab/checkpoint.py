"""A trained model from its checkpoint alone: ``load_run(path) -> (module or net, cfg, tokenizer)``.

Every checkpoint written by ``train.py`` holds, beside Lightning's ``state_dict`` (keys
``net.*``), the record ``checkpoint["saffu_lab"]`` (``saffu_lab.train.run_record``):

- ``config``: the run's resolved config (model, framing, regime, data, ...);
- ``model_kwargs``: the data-derived constructor arguments of the model (vocabulary size, and for
  SAFFU models the training target counts, the number of training documents and the special ids);
- ``tokenizer``: the run's ``tokenizers.Tokenizer`` as its JSON string.

So the model is rebuilt exactly as the run built it, ``instantiate(cfg.model, **model_kwargs)``
wrapped by ``instantiate(cfg.regime, net=net)``, without the training corpus; ``eval.py`` and
``generate.py`` read checkpoints through here.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from saffu_lab.errors import ConfigError, DataError

RECORD = "saffu_lab"
EXAMPLE = "logs/train/runs/<run>/checkpoints/last.ckpt"


def read_checkpoint(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint as a dict, after checking that it is one of ours (clear errors otherwise)."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.exists():
        raise DataError(f"checkpoint {str(path)!r} does not exist; give the path of a .ckpt file written by train.py, "
                        f"e.g. {EXAMPLE}")
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} is a folder, not a file; give a .ckpt file in it, e.g. {EXAMPLE}")
    try:
        # our own run files: they hold a config dict and (since resume support) NumPy random states
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, AttributeError,
            ModuleNotFoundError, UnicodeDecodeError) as err:
        raise DataError(f"{str(path)!r} is not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}); "
                        f"give a .ckpt file written by train.py, e.g. {EXAMPLE}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict); give a .ckpt file written by "
                        f"train.py, e.g. {EXAMPLE}")
    record = checkpoint.get(RECORD)
    if record is None:
        raise DataError(f"{str(path)!r} was written before checkpoints carried their config and tokenizer (it has no "
                        f"'{RECORD}' record): eval.py and generate.py need a checkpoint from a run of this version of "
                        "train.py; train the model again")
    if not isinstance(record, dict) or not {"config", "model_kwargs", "tokenizer"} <= set(record):
        raise DataError(f"{str(path)!r} has a damaged '{RECORD}' record (it needs config, model_kwargs and tokenizer); "
                        "train the model again")
    return checkpoint


def load_run(ckpt_path: str | Path, module: bool = True, map_location: str | torch.device = "cpu"):
    """``(model, cfg, tokenizer)`` of a checkpoint written by ``train.py``.

    ``model`` is the ``LanguageModelModule`` (``module=True``) or the bare network (``module=False``:
    no PyTorch Lightning import, for ``generate.py``), with the checkpoint's weights, in eval mode;
    ``cfg`` the run's config (a ``DictConfig``); ``tokenizer`` the run's ``tokenizers.Tokenizer``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    checkpoint = read_checkpoint(ckpt_path, map_location)
    record = checkpoint[RECORD]
    cfg = OmegaConf.create(record["config"])
    try:
        tokenizer = Tokenizer.from_str(record["tokenizer"])
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises its own Exception type
        raise DataError(f"the tokenizer inside {str(ckpt_path)!r} cannot be read ({_first_line(err)}); train the model again") from None
    try:
        net = instantiate(cfg.model, **model_kwargs(record["model_kwargs"]))
        model = instantiate(cfg.regime, net=net) if module else net
        prefix = "" if module else "net."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        model.load_state_dict(_without_stale_guides(state, model))
    except InstantiationException as err:
        raise ConfigError(f"cannot rebuild the model of {str(ckpt_path)!r} with this version of the code: "
                          f"{_first_line(_root_cause(err))}") from None
    except RuntimeError as err:  # load_state_dict: missing or unexpected keys, shape mismatches
        raise DataError(f"the weights in {str(ckpt_path)!r} do not fit the model its config builds "
                        f"({_first_line(err)})") from None
    if module:
        model.run_record = record  # a checkpoint saved from it carries the record again
    return model.eval(), cfg, tokenizer


def model_kwargs(saved: dict) -> dict:
    """The constructor arguments as the run passed them: ``special_ids`` back to ``SpecialIds``."""
    from saffu_lab.framing import SpecialIds

    kwargs = dict(saved)
    if isinstance(kwargs.get("special_ids"), dict):
        kwargs["special_ids"] = SpecialIds(**kwargs["special_ids"])
    return kwargs


def _without_stale_guides(state: dict, model: torch.nn.Module) -> dict:
    """The weights to load. A dense guide of self-guided training (``*.guide.*``) is kept only if
    the layer has one; its mixing weight alpha is not saved, so a checkpoint taken while guides
    were attached loads as the structured model alone (what the run becomes once they drop)."""
    own = set(model.state_dict())
    return {k: v for k, v in state.items() if ".guide." not in k or k in own}


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
