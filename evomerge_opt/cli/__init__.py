"""The ``evo-merge`` command line: one module per subcommand, dispatched by :mod:`evomerge_opt.cli.main`."""
