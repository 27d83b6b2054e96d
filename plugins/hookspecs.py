"""The hook specifications: the documented contract between anymodal and its plugins.

A plugin is a module (or object) with functions decorated by ``anymodal.plugins.hookimpl``
whose names are the hooks below. It is found through the ``anymodal`` entry-point group of an
installed package, or through the config's ``plugins: [dotted.module]`` list. The built-in
modalities and components are plugins like any other (``anymodal.plugins.builtin``).

Every ``register_*`` hook is called once when components are loaded, takes no arguments, and
returns a mapping of name to factory (or None). A factory is called with its config section as
keyword arguments; a name registered twice is an error naming both plugins. None of these hooks is
first-result or historic: every plugin's answer is collected.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import pluggy

PROJECT = "anymodal"
API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Factories = Optional[Mapping[str, Callable[..., Any]]]


@hookspec
def register_tokenizers() -> Factories:
    """Tokenizers: raw batch tensor(s) -> ``Tokens``.

    Called once at load time. A factory receives the tokenizer's config section plus ``dim`` (the
    encoder width) and returns an ``nn.Module`` whose ``forward(x) -> Tokens`` takes the collated
    batch field named by its ``input_key`` attribute, and which has the attributes ``dim``,
    ``pos_axes`` (k of ``Tokens.pos``) and ``grid_size`` (tuple or None); ``target_dim`` when it
    gives reconstruction targets.

    :return: mapping of tokenizer name to factory, or None.
    """


@hookspec
def register_datasets() -> Factories:
    """Datasets: a factory receives its config section plus ``split`` (``"train"`` or ``"test"``)
    and returns a ``torch.utils.data.Dataset`` whose items are sample dicts
    ``{<modality key>: tensor, "label"?: int, "text"?: str}``. Datasets that draw random numbers
    take them from the ``torch.Generator`` passed as ``dataset.sample(index, generator)`` if they
    define ``sample``; this is what makes resumed runs exact.

    :return: mapping of dataset name to factory, or None.
    """


@hookspec
def register_transforms() -> Factories:
    """Transforms: a factory receives its config section and returns a callable
    ``(tensor, generator) -> tensor`` applied to one sample's modality tensor.

    :return: mapping of transform name to factory, or None.
    """


@hookspec
def register_maskers() -> Factories:
    """Maskers: a factory receives its config section and returns a callable
    ``(tokens, generator) -> Mask`` (see ``anymodal.core.masking``).

    :return: mapping of masker name to factory, or None.
    """


@hookspec
def register_objectives() -> Factories:
    """Objectives: a factory receives its config section plus ``dim`` (encoder width),
    ``tokenizer`` (the student's) and, if it has a ``teacher_dim`` parameter, the stage teacher's
    width. It returns an ``nn.Module`` with ``forward(batch, student, teacher=None) ->
    ObjectiveOutput``. Class attributes ``needs_mask`` / ``needs_teacher`` (default False) make a
    stage without a masker / teacher an error at build time.

    :return: mapping of objective name to factory, or None.
    """


@hookspec
def register_teachers() -> Factories:
    """Teachers: a factory receives its config section plus ``student`` (the student `Backbone`)
    and, if it has a ``folder`` parameter, the run folder (`RunFolder`, for earlier stages'
    checkpoints). It returns an ``nn.Module`` called as ``teacher(batch, layers=0) -> Encoded``
    over the student's full token set, used under ``no_grad`` by objectives that ask for one. A
    teacher with an ``update(student, step, total)`` method is updated after every optimizer step
    and its state is saved in checkpoints (an EMA); others are rebuilt on resume.

    :return: mapping of teacher name to factory, or None.
    """


@hookspec
def configure(config: Any) -> Optional[Mapping[str, Any]]:
    """Called after the config is composed and before it is validated.

    :param config: the composed config (an OmegaConf DictConfig, read-only by convention).
    :return: a mapping of defaults to merge beneath the config (the config's own values win), or None.
    """
