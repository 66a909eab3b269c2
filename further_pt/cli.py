"""The ``further-pt`` command: list recipes, check a config, run a job in this process.

    further-pt recipes                                # the shipped recipes, one line each
    further-pt config recipe=in_domain data.train_files=[c.txt]  # validate, print the YAML
    further-pt pretrain recipe=demo                   # one process; for several processes:
                                                      # accelerate launch further_pt/pretrain.py
"""

from __future__ import annotations

import sys

from further_pt import config

USAGE = """usage: further-pt {recipes,config,pretrain} [recipe=NAME] [key=value ...]

  recipes    list the shipped recipes
  config     validate a recipe with overrides and print the resolved config (runs nothing)
  pretrain   further-pretrain in this process (multi-GPU: accelerate launch further_pt/pretrain.py)
"""


def _describe(name: str) -> str:
    lines = (config.recipes_dir() / f"{name}.yaml").read_text().splitlines()
    first = next((line for line in lines if line.startswith("#")), "#")
    return first.lstrip("# ").strip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "recipes":
        for name in config.available_recipes():
            print(f"{name:14s} {_describe(name)}")
        return 0
    if command == "config":
        try:
            print(config.to_yaml(config.load(rest, config.PretrainSchema)), end="")
        except config.ConfigError as exc:
            print(f"further_pt: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if command == "pretrain":
        from further_pt.pretrain import main as pretrain_main

        return pretrain_main(rest)
    print(f"further_pt: error: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
