"""One module per subcommand of ``python -m loop``.

Each module exposes ``add_parser(subparsers)`` (builds its argparse sub-parser and sets
``func``) and keeps heavy imports (torch, transformers) inside the function that runs it, so
``python -m loop --help`` stays fast.
"""

# The order here is the order in ``python -m loop --help``.
COMMANDS = ["run", "worker", "plan", "eval", "rescore", "train", "diagnose", "log", "show", "compare",
            "pin", "report", "export"]
