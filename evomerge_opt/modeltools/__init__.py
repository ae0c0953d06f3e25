"""Build, inspect, kick-test and carry models: the machinery behind ``evo-merge model construct|test``.

* :mod:`.construct`: model sources (model config YAML, model directory, recipe), construction on any
  device (``meta`` allocates nothing), output-directory reuse and atomic saving.
* :mod:`.checkpoint_load`: non-strict ``--load-from-checkpoint`` with a report of missing/unexpected names.
* :mod:`.report`: config, tokenizer and per-group parameter counts as text.
* :mod:`.kicktest`: forward + backward + SGD steps with loud failures (NaN loss, unreached parameters).
* :mod:`.options`: the dynamic size options derived from ``ModelConfigSpec``.
"""

from evomerge_opt.modeltools.checkpoint_load import LoadReport, load_checkpoint_non_strict
from evomerge_opt.modeltools.construct import (
    BuiltModel,
    ConstructOptions,
    ModelSource,
    construct,
    make_source,
    model_from_config,
    save_output_dir,
)
from evomerge_opt.modeltools.kicktest import (
    KickTestError,
    KickTestResult,
    kick_test,
    random_batches,
    window_batches,
)
from evomerge_opt.modeltools.report import count_parameters, param_group

__all__ = [
    "BuiltModel",
    "ConstructOptions",
    "KickTestError",
    "KickTestResult",
    "LoadReport",
    "ModelSource",
    "construct",
    "count_parameters",
    "kick_test",
    "load_checkpoint_non_strict",
    "make_source",
    "model_from_config",
    "param_group",
    "random_batches",
    "save_output_dir",
    "window_batches",
]
