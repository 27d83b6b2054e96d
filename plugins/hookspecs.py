"""The hook specifications: the documented contract between anymodal and its plugins.

A plugin is a module (or object) with functions decorated by ``anymodal.plugins.hookimpl``
whose names are the hooks below. It is found through the ``anymodal`` entry-point group of an
installed package, or through the config's ``plugins: [dotted.module]`` list. The built-in
modalities (``anymodal.plugins.image``, ``video``, ``lidar``, ``audio``, ``text``) and the
modality-free components (``anymodal.plugins.components``) are plugins like any other, in the same
entry-point group.

Every ``register_*`` hook is called once when components are loaded, takes no arguments, and
returns a mapping of name to factory (or None). A factory is called with its config section as
keyword arguments; a name registered twice is an error naming both plugins. None of these hooks is
first-result or historic: every plugin's answer is collected.

Checked when a plugin registers, each failure a `PluginError` naming the plugin: a function marked
``@hookimpl`` whose name is not a hook below (with the closest hook's name; mark a hook of a later
API version ``@hookimpl(optionalhook=True)`` to have it skipped), a plugin module's function named
as a hook (or nearly) but not marked (pluggy would never call it), a hook's arguments, what each
``register_*`` hook returns (a mapping of non-empty string names to callables), and the arguments
anymodal always passes to a factory (listed with each hook; a factory must take them, by name or
through ``**kwargs``). An exception raised in a plugin's code (importing it, in a hook, in a
tokenizer during the load check) is reported with its type, message and the file and line in the
plugin where it was raised.

Versioning: this module is plugin API version ``API_VERSION``. A plugin states the version it
targets as a module attribute ``ANYMODAL_API = 1``; a plugin targeting another version is refused
at load with a `PluginError` saying both versions (no attribute: assumed current). A change that
breaks a contract below bumps ``API_VERSION``; additions (a new optional hook or attribute) do not.
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
    """Tokenizers: raw batch tensor(s) -> ``Tokens``. Called once at load time; not first-result.

    A factory receives the tokenizer's config section plus ``dim`` (the encoder width) and returns
    an ``nn.Module`` with these attributes:

    - ``input_key``: the collated batch field it reads;
    - ``dim``: the encoder width it was given;
    - ``pos_axes``: ``k``, the coordinates per token in ``Tokens.pos``;
    - ``grid_size``: the token grid (tuple of ints) when tokens lie on a fixed integer grid, else None;
    - ``target_dim`` (optional): ``P`` of ``Tokens.targets`` when it gives reconstruction targets
      (``masked_pixel`` needs it).

    ``forward(x, padding=None) -> Tokens``. When the collated batch has ``<input_key>_padding``
    (`anymodal.core.data.collate` zero-pads variable-length sets such as point clouds along their
    first dimension and adds that ``[B, N]`` bool field, True = padding), the backbone calls
    ``tokenizer(batch[input_key], padding=...)``; fixed-shape inputs are passed alone. The result
    must hold: ``x`` floating ``[B, N, dim]``; ``pos`` ``[B, N, pos_axes]``, integer grid
    coordinates in ``[0, grid_size)`` when ``grid_size`` is set, else continuous (float, use
    ``model.posenc=mlp``); ``padding`` None or bool ``[B, N]`` (True = no real token);
    ``targets`` ``[B, N, target_dim]`` when ``target_dim`` exists.

    Dtype: outside autocast ``x`` has the dtype of the model's parameters, which is torch's default
    dtype when the model is built (``torch.float32``), and so do the tokenizer's own floating
    parameters (no ``.double()``); under autocast, whatever its layers give is fine. The encoder's
    LayerNorm refuses float64 tokens.

    Scale: the encoder adds a positional encoding to ``x`` and then normalizes; the default sin-cos
    encoding has an RMS of 1/sqrt(2) = 0.71 per channel. Embeddings should have an RMS of order
    0.2-1 per channel, what a default-initialized ``nn.Linear`` or ``nn.Conv2d`` patch embedding of
    inputs normalized to about unit scale gives (the built-in tokenizers: largest tokens 0.36-0.66
    on their data). Much smaller, the encoder sees mostly positions (a tokenizer whose tokens were
    near 0.07 trained at a constant loss); much larger, it loses the positions.

    Optional methods:

    - ``reconstruction_loss(pred, target) -> scalar`` over ``[B, M, target_dim]``: used by
      ``masked_pixel`` instead of its MSE/L1 (e.g. Chamfer distance between point groups);
    - ``render(x, targets, keep) -> [B, C, H, W]`` maps per-token targets ``[B, N, P]`` back to a
      picture (tokens where ``keep [B, N]`` is False drawn blank) and ``preview(x) -> [B, C, H, W]``
      shows the input; with ``render`` the evaluation draws reconstructions (``tokenizers/image.py``).

    Checked on load (API version 1): a factory from any plugin but the built-in one must have
    ``example_input(batch_size)`` (a classmethod or static function) returning a sample batch:
    a list of sample dicts (collated as the loader does, so ragged sets get their padding field)
    or an already collated mapping. The tokenizer is built with ``dim`` and its own defaults, run
    on ``example_input(2)``, and every broken rule above (dtype included) is reported in one
    `PluginError` naming the plugin and the tokenizer; an exception it raises is reported with its
    type, message and the file and line in the plugin. The scale is checked on the same batch: when
    no real token reaches an RMS of 0.2, or the median token exceeds 10, a warning gives the
    measured RMS (largest and median token) next to the sin-cos encoding's, and the plugin loads.

    :return: mapping of tokenizer name to factory, or None.
    """


@hookspec
def register_datasets() -> Factories:
    """Datasets. Called once at load time; not first-result.

    A factory receives its config section plus ``split`` (``"train"`` or ``"test"``; always
    passed, so a factory must take it) and returns a ``torch.utils.data.Dataset`` whose items are sample dicts
    ``{<modality key>: tensor, "label"?: int, "text"?: str}``: ``label`` (and any field named in
    ``eval.labels``) feeds the probes, ``text`` the captions of ``contrastive`` with ``pair: text``. Datasets that draw random numbers
    take them from the ``torch.Generator`` passed as ``dataset.sample(index, generator)`` if they
    define ``sample``; this is what makes resumed runs exact.

    :return: mapping of dataset name to factory, or None.
    """


@hookspec
def register_transforms() -> Factories:
    """Transforms. Called once at load time; not first-result.

    A factory receives its config section and returns a callable
    ``(tensor, generator) -> tensor`` applied to one sample's modality tensor.

    :return: mapping of transform name to factory, or None.
    """


@hookspec
def register_maskers() -> Factories:
    """Maskers. Called once at load time; not first-result.

    A factory receives its config section and returns a callable
    ``(tokens, generator) -> Mask`` (see ``anymodal.core.masking``).

    :return: mapping of masker name to factory, or None.
    """


@hookspec
def register_objectives() -> Factories:
    """Objectives. Called once at load time; not first-result.

    A factory receives its config section plus ``dim`` (encoder width) and ``tokenizer`` (the
    student's), always passed, and, if it has a ``teacher_dim`` parameter, the stage teacher's
    width. It returns an ``nn.Module`` that keeps the ``Objective`` Protocol of
    ``anymodal.core.objective``: ``forward(batch, student, teacher=None) -> ObjectiveOutput``
    (``batch.raw`` the collated samples, ``batch.tokens`` the student's tokens, ``batch.mask`` the
    stage masker's choice or None; ``ObjectiveOutput(loss, metrics)``, metrics as detached 0-d
    tensors, or floats). Its class attributes, each False when absent: ``needs_mask`` /
    ``needs_teacher`` make a stage without a masker / teacher an error at build time;
    ``needs_targets`` keeps the tokenizer's reconstruction targets on (``TargetSwitch``).

    :return: mapping of objective name to factory, or None.
    """


@hookspec
def register_teachers() -> Factories:
    """Teachers. Called once at load time; not first-result.

    A factory receives its config section plus ``student`` (the student `Backbone`), always
    passed, and, if it has a ``folder`` parameter, the run folder (`RunFolder`, for earlier stages'
    checkpoints). It returns an ``nn.Module`` that keeps the ``Teacher`` Protocol of
    ``anymodal.core.teachers``: called as ``teacher(batch, layers=0) -> Encoded`` over the
    student's full token set, with a ``dim`` attribute (its feature width, passed as
    ``teacher_dim``), used under ``no_grad`` by objectives that ask for one. A teacher that is also a ``MovingTeacher`` (an
    ``update(student, step, total)`` method, as an EMA) is updated after every optimizer step and
    its state is saved in checkpoints; others are rebuilt on resume.

    :return: mapping of teacher name to factory, or None.
    """


@hookspec
def configure(config: Any) -> Optional[Mapping[str, Any]]:
    """Called after the config is composed and before it is validated, once per command that reads
    a config (train, config); every plugin's answer is collected (not first-result, not historic).

    :param config: the composed config (an OmegaConf DictConfig, read-only by convention).
    :return: a mapping of defaults to merge beneath the config (the config's own values win), or None.
    """


@hookspec
def report_environment() -> Optional[Mapping[str, str]]:
    """What ``anymodal doctor`` should say about the things this plugin needs that are not Python
    packages it imports at load time (a vocabulary file, a decoder library, a data cache).

    :return: a mapping of a short label to its status line (``"present   <where>"`` or
        ``"missing   <how to get it>"``), or None.
    """
