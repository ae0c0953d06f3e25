"""``evo-merge model [options] construct|test``: build, inspect, save and kick-test a model.

Examples::

    evo-merge model --config tiny.yaml construct                      # on meta: config + counts, nothing allocated
    evo-merge model --config tiny.yaml --hidden-size 64 -r construct  # rebuild output_models/tiny with a new size
    evo-merge model --config tiny.yaml --device cpu --save-checkpoint --safetensors construct
    evo-merge model --model zoo:math --device cpu test --steps 3 --sequence-length 64
    evo-merge model --recipe recipes/best.yaml --device cpu test --dataset zoo:data/math/dev.jsonl

Model-level options may be given before or after the subcommand. Exit codes: 0 ok, 1 the model failed
``test`` (NaN/inf loss, gradient not reaching a parameter), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evomerge_opt.modeltools.construct import ATTN_IMPLEMENTATIONS


def _model_options(parser: argparse.ArgumentParser | Any, suppress: bool) -> None:
    """The model-level options; on a subcommand parser (``suppress``) they do not reset earlier values."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--device", default=default("meta"),
                        help="Device to construct the model on: meta (nothing allocated), cpu, cuda (default: meta)")
    parser.add_argument("--dtype", default=default(None),
                        help="Construct/load with this torch dtype (e.g. bfloat16, float32; default: the config's)")
    parser.add_argument("--no-init-weights", action="store_true", default=default(False),
                        help="Construct with transformers' no_init_weights() (weights left uninitialised)")
    parser.add_argument("--load-from-checkpoint", metavar="PATH", default=default(None),
                        help="Load weights non-strictly from a checkpoint (safetensors file, sharded dir with "
                             "index, HF model dir, or .bin/.pt read with weights_only=True); warns with the "
                             "names of parameters/buffers not found and of unexpected tensors")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=default(False),
                        help="Enable gradient checkpointing")
    parser.add_argument("--fuse-optim-with-backward", action="store_true", default=default(False),
                        help="test: take each parameter's SGD step during the backward and free its gradient "
                             "at once (less memory)")
    parser.add_argument("--refresh-model", "-r", action="store_true", default=default(False),
                        help="Regenerate the output directory from the sources instead of reusing it")
    parser.add_argument("--save-checkpoint", action="store_true", default=default(False),
                        help="Save the weights into the output directory (needs a real --device)")
    parser.add_argument("--safetensors", action="store_true", default=default(False),
                        help="Accepted for compatibility and does nothing: weights are always saved as safetensors "
                             "(the only format transformers 5 writes)")
    parser.add_argument("-o", "--output-file", metavar="FILE", default=default(None),
                        help="Write the report to FILE instead of stdout")
    parser.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=default(None),
                        help="Attention implementation")
    parser.add_argument("--seed", type=int, default=default(0),
                        help="Seed of the weight initialisation and of the random test tokens (default: 0)")
    parser.add_argument("--trust-remote-code", action="store_true", default=default(False),
                        help="Allow custom modeling code of a --model directory (evo-merge's DFS models "
                             "never need it)")
    parser.add_argument("--format", choices=("evo", "plain"), default=default("evo"),
                        help="--recipe with a DFS recipe: evo (default, the Evo*Affine wrapper) or plain (a standard "
                             "Llama/Mistral with one layer per hop, as `evo-merge apply --format plain` writes)")
    parser.add_argument("--max-shard-size", default=default("5GB"),
                        help="Largest weights shard written by --save-checkpoint (default: 5GB)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evomerge_opt.modeltools.options import add_size_arguments

    parser.description = ("Construct or kick-test a model definition: build it from a config, a model dir or a "
                          "recipe, save it, and check that a few training steps run.")
    parser.epilog = __doc__.split("Examples::", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_argument_group("model source (exactly one)")
    source.add_argument("--config", metavar="MODEL_YAML", help="Model config YAML (architecture, sizes, dtype)")
    source.add_argument("--model", metavar="PATH", help="Existing model directory or zoo:NAME")
    source.add_argument("--recipe", metavar="RECIPE_YAML", help="PS or DFS recipe, built in memory first")
    _model_options(parser, suppress=False)
    dynamic = parser.add_argument_group(
        "Dynamic arguments (from the model config schema; they override --config)")
    dynamic.add_argument("--output-dir", metavar="DIR",
                         help="Model output directory (default: output_models/MODEL_NAME for --config/--recipe)")
    dynamic.add_argument("--model-name", help="Model name (default: the config/recipe file stem or directory name)")
    add_size_arguments(dynamic)

    sub = parser.add_subparsers(dest="model_command", metavar="{construct,test}", title="Model subcommands",
                                required=True)
    construct = sub.add_parser("construct", help="Construct a model",
                               description="Construct a model; print config, tokenizer and parameter counts.")
    _model_options(construct, suppress=True)
    test = sub.add_parser("test", help="Test model forward and backward",
                          description="Forward + backward + a few SGD steps on random tokens or a dataset.")
    _model_options(test, suppress=True)
    test.add_argument("--batch-size", type=int, default=2, help="Batch size (default: 2)")
    test.add_argument("--sequence-length", type=int, default=512, help="Sequence length (default: 512)")
    test.add_argument("--steps", type=int, default=1, help="Number of train steps (default: 1)")
    test.add_argument("--lr", type=float, default=0.01, help="Learning rate of the SGD steps (default: 0.01)")
    data = test.add_argument_group("dataset (the evaluator's data options; default: random tokens)")
    data.add_argument("--dataset", metavar="PATH", help="Text/json/jsonl/parquet/csv file or zoo:data/...")
    data.add_argument("--text-field", help="Field holding the text (default: found automatically)")
    data.add_argument("--packed", "--packing", dest="packing", action="store_true",
                      help="Pack documents into full windows (EOS-separated)")
    data.add_argument("--num-samples", type=int, help="Use at most this many documents")
    data.add_argument("--max-tokens", type=int, help="Use at most this many tokens")
    data.add_argument("--add-eos", action="store_true", help="Append EOS to every document")
    data.add_argument("--text-split", choices=("line", "paragraph", "document"),
                      help="How a .txt file splits into documents (default: line)")


# ------------------------------------------------------------------------------------------------ run


class _Output:
    """Report lines: printed as they come, or collected for ``-o FILE`` (written atomically at the end)."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.lines: list[str] = []

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(line)
            if self.file is None:
                print(line, flush=True)

    def close(self) -> None:
        if self.file is not None:
            from evomerge_opt.io.atomic import atomic_write_text

            atomic_write_text(self.file, "\n".join(self.lines) + "\n")
            print(f"report written to {self.file}")


def run(args: argparse.Namespace) -> int:
    from evomerge_opt.config.model_config import parse_dtype
    from evomerge_opt.errors import ConfigError
    from evomerge_opt.modeltools.construct import ConstructOptions, default_output_dir, make_source
    from evomerge_opt.modeltools.options import size_overrides

    command = args.model_command
    if command == "test" and args.device == "meta":
        raise ConfigError(
            "`model test` needs a real device: the default device 'meta' allocates nothing and cannot run a "
            "forward pass; pass --device cpu (or cuda)."
        )
    if command == "test" and args.save_checkpoint:
        raise ConfigError("--save-checkpoint belongs to `model construct`; `model test` never writes the model.")
    if args.save_checkpoint and args.device == "meta":
        raise ConfigError(
            "--save-checkpoint needs a real device: pass --device cpu (the model on 'meta' has no weights to save)."
        )
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if args.format != "evo" and not args.recipe:
        raise ConfigError("--format plain chooses how a DFS --recipe is built; a --model directory or --config "
                          "already has its format. Drop --format, or give --recipe DFS_RECIPE.")
    source = make_source(args.config, args.model, args.recipe, size_overrides(args), args.model_name)
    options = ConstructOptions(
        device=args.device, dtype=dtype, init_weights=not args.no_init_weights, seed=args.seed,
        attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code,
        format=args.format,
    )
    if args.output_dir:
        output_dir: Path | None = Path(args.output_dir)
    elif source.kind != "model":
        output_dir = default_output_dir(source)
    elif args.save_checkpoint:
        raise ConfigError(
            "--save-checkpoint with --model needs --output-dir DIR (the source directory is never overwritten)."
        )
    else:
        output_dir = None
    if output_dir is not None and source.kind == "model" and output_dir.resolve() == Path(source.path).resolve():
        raise ConfigError(f"--output-dir {output_dir} is the --model directory itself; choose another directory.")
    out = _Output(args.output_file)
    try:
        if command == "construct":
            return _construct(args, source, options, output_dir, out)
        return _test(args, source, options, output_dir, out)
    finally:
        out.close()


def _build(args: argparse.Namespace, source: Any, options: Any, output_dir: Path | None, out: _Output) -> Any:
    from evomerge_opt.config.model_config import dtype_name
    from evomerge_opt.modeltools.checkpoint_load import load_checkpoint_non_strict
    from evomerge_opt.modeltools.construct import construct

    built = construct(source, options, output_dir=output_dir, refresh=args.refresh_model)
    model = built.model
    out(f"Model: {source.name}  ({source.describe()}"
        + (f"; reused output directory {built.loaded_from})" if built.reused_output_dir else ")"))
    out(*built.notes)
    first = next(model.parameters())
    out(f"Class: {type(model).__name__}  device: {first.device}  dtype: {dtype_name(first.dtype)}  "
        f"attention: {getattr(model.config, '_attn_implementation', None)}")
    if args.load_from_checkpoint:
        report = load_checkpoint_non_strict(model, args.load_from_checkpoint)
        built.weights = f"loaded from checkpoint {args.load_from_checkpoint} (non-strict; before: {built.weights})"
        out("Checkpoint: " + report.lines()[0], *("  " + line for line in report.lines()[1:]))
    out(f"Weights: {built.weights}")
    return built


def _construct(args: argparse.Namespace, source: Any, options: Any, output_dir: Path | None, out: _Output) -> int:
    from evomerge_opt.modeltools.construct import save_output_dir
    from evomerge_opt.modeltools.report import config_lines, count_parameters, tokenizer_lines

    built = _build(args, source, options, output_dir, out)
    model = built.model
    if args.gradient_checkpointing:
        from evomerge_opt.modeltools.kicktest import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
        out("Gradient checkpointing: enabled")
    out(*config_lines(model.config))
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    out(*tokenizer_lines(built.tokenizer, vocab))
    out(*count_parameters(model).lines())
    write = output_dir is not None and (args.save_checkpoint or not built.reused_output_dir)
    if write:
        files = save_output_dir(built, output_dir, save_weights=args.save_checkpoint,
                                max_shard_size=args.max_shard_size, overwrite=args.refresh_model)
        weights = "with weights (safetensors)" if args.save_checkpoint else "definition only, no weights"
        out(f"Output directory: {output_dir} ({weights}): {', '.join(files)}")
    elif output_dir is not None:
        out(f"Output directory: {output_dir} reused, not rewritten (pass --save-checkpoint to save weights "
            "into it, -r to rebuild it)")
    else:
        out("Output directory: none (pass --output-dir to write one)")
    return 0


def _test(args: argparse.Namespace, source: Any, options: Any, output_dir: Path | None, out: _Output) -> int:
    from evomerge_opt.modeltools.kicktest import KickTestError, kick_test, random_batches, window_batches

    built = _build(args, source, options, output_dir, out)
    model = built.model
    vocab = model.get_input_embeddings().num_embeddings
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and args.sequence_length > max_positions:
        out(f"WARNING: --sequence-length {args.sequence_length} exceeds the model's max_position_embeddings "
            f"{max_positions}; positions beyond it were never meant to be used.")
    if args.dataset:
        batches, what = _dataset_batches(args, built.tokenizer, vocab, window_batches)
    else:
        batches = random_batches(vocab, args.batch_size, args.sequence_length, args.seed)
        what = f"random tokens (seed {args.seed}), batch {args.batch_size} x {args.sequence_length}"
    out(f"Test: {args.steps} SGD step(s), lr {args.lr}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}"
        + (", optimizer fused with backward" if args.fuse_optim_with_backward else "") + f"; data: {what}")
    try:
        result = kick_test(model, batches, steps=args.steps, lr=args.lr,
                           gradient_checkpointing=args.gradient_checkpointing,
                           fuse_optim_with_backward=args.fuse_optim_with_backward,
                           on_step=lambda record: out(record.line(args.steps)))
    except KickTestError as exc:
        out(f"FAILED: {exc}")
        print(f"evo-merge model test: FAILED: {exc}", file=sys.stderr)
        return 1
    out(f"OK: {len(result.steps)} step(s), every loss finite, all {result.trainable} trainable parameter "
        f"tensors received non-zero gradients" + (f" ({result.frozen} frozen)" if result.frozen else ""))
    return 0


def _dataset_batches(args: argparse.Namespace, tokenizer: Any, vocab: int, window_batches: Any) -> tuple[Any, str]:
    from evomerge_opt.data.spec import DataSpec
    from evomerge_opt.data.windows import load_windows
    from evomerge_opt.errors import ConfigError

    if tokenizer is None:
        raise ConfigError(
            "--dataset needs a tokenizer, but the model has none; use a model directory with tokenizer files "
            "or set `tokenizer:` in the model config."
        )
    spec = DataSpec.parse(
        args.dataset, seq_len=args.sequence_length, text_field=args.text_field, packing=args.packing or None,
        num_samples=args.num_samples, max_tokens=args.max_tokens, add_eos=args.add_eos or None,
        text_split=args.text_split, seed=args.seed,
    )
    windows = load_windows(spec, tokenizer)
    top = int(windows.input_ids[windows.attention_mask.bool()].max())
    if top >= vocab:
        raise ConfigError(
            f"the tokenizer produced token id {top}, but the model's embedding has only {vocab} rows; "
            "the tokenizer does not belong to this model."
        )
    what = (f"dataset {spec.name}: {windows.num_rows} rows, {windows.num_tokens} tokens, "
            f"batch {args.batch_size} x <= {args.sequence_length}")
    return window_batches(windows.input_ids, windows.attention_mask, args.batch_size), what
