"""The documentation: every recipe key documented, the key reader exact, the README short.

The recipe key reference (docs/reference/recipe-keys.md) is generated from the recipes'
comments by further_pt/config/keys.py, so a key without a comment would be a hole in the
reference, and a key the reader missed would be a silent one. The site itself is built
with ``mkdocs build --strict`` (slow: it starts mkdocs in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from further_pt.config.keys import read_keys, undocumented
from further_pt.config.reference import reference_markdown

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
TEST_COMMAND = ("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false "
                ".venv/bin/python -m pytest -q")


def _leaves(data: object, prefix: str = "") -> set[str]:
    if isinstance(data, dict) and data:
        return {leaf for k, v in data.items()
                for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))}
    return {prefix}


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_recipes_are_found() -> None:
    names = {_name(p) for p in RECIPES}
    assert {"recipes/base/pretrain.yaml", "recipes/base/finetune.yaml",
            "recipes/demo.yaml", "recipes/paper_grid.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_every_recipe_key_has_a_comment(recipe: Path) -> None:
    missing = undocumented(recipe.read_text(), _name(recipe))
    assert not missing, (f"{_name(recipe)}: keys without a comment (say what each does, "
                         f"after `#` on its line): {', '.join(missing)}")


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_the_reader_finds_exactly_the_yaml_keys(recipe: Path) -> None:
    text = recipe.read_text()
    keys = read_keys(text, _name(recipe))
    assert {k.path for k in keys if not k.mapping} == _leaves(yaml.safe_load(text))
    assert all(k.line > 0 for k in keys)


INLINE = """\
# a header comment is nobody's key comment
output_dir: runs/x        # where it writes
train:
  extend_vocab: null      # or {max_new_tokens: 2000, min_frequency: 50}: frequent corpus
                          # words the tokenizer splits become tokens (mean-initialised)
  head_warmup:            # new heads learn alone first
    # a leading comment belongs to no key
    steps: auto           # auto: only when heads are missing
    lr: 1.0e-3            # the heads' lr: "quoted # is not a comment" here
  name: "a#b"             # a quoted hash
  files:                  # a block sequence
    - a.txt
    - b.txt
  empty:                  # null, written as nothing
seed: 42
"""


def test_multi_line_and_block_header_comments() -> None:
    keys = {k.path: k for k in read_keys(INLINE)}
    assert keys["train.extend_vocab"].comment == (
        "or {max_new_tokens: 2000, min_frequency: 50}: frequent corpus words the tokenizer "
        "splits become tokens (mean-initialised)")
    assert keys["train.extend_vocab"].value == "null"
    header = keys["train.head_warmup"]
    assert header.mapping and header.comment == "new heads learn alone first"
    assert keys["train.head_warmup.steps"].comment == "auto: only when heads are missing"
    assert keys["train.head_warmup.lr"].value == "1.0e-3"
    assert keys["train.name"].value == '"a#b"' and keys["train.name"].comment == "a quoted hash"
    assert keys["train.files"].value == "[a.txt, b.txt]"
    assert keys["train.empty"].value == "" and not keys["train.empty"].mapping
    assert keys["train"].mapping and keys["train"].comment == ""
    assert keys["seed"].comment == "" and keys["output_dir"].comment == "where it writes"
    assert list(keys) == ["output_dir", "train", "train.extend_vocab", "train.head_warmup",
                          "train.head_warmup.steps", "train.head_warmup.lr", "train.name",
                          "train.files", "train.empty", "seed"]


def test_an_undocumented_key_is_named() -> None:
    # `seed` and the nested block header `train.head_warmup` lack comments; the top-level
    # section `train:` needs none
    text = "seed: 42\ntrain:\n  lr: 1.0e-4   # peak lr\n  head_warmup:\n    steps: 3   # n\n"
    assert undocumented(text, "mine.yaml") == ["seed", "train.head_warmup"]


def test_a_key_the_reader_cannot_follow_is_an_error_naming_file_and_key() -> None:
    # a multi-line plain scalar: YAML reads one value, the reader would see a stray line
    with pytest.raises(ValueError, match=r"^mine\.yaml: line 4"):
        read_keys("train:\n  lr: 1.0\n  note: one\n    two\n", "mine.yaml")
    with pytest.raises(ValueError, match=r"mine\.yaml: key seed is written twice"):
        read_keys("seed: 1\nseed: 2\n", "mine.yaml")


def test_the_reference_lists_every_recipe_and_key() -> None:
    page = reference_markdown(REPO / "recipes")
    for recipe in RECIPES:
        name = recipe.relative_to(REPO / "recipes").with_suffix("").as_posix()
        assert f"\n## {name}\n" in page
    assert "| `data.train_files` |" in page and "| `objective.head_warmup` |" in page
    assert "| `train.global_batch_size` | `32` |" in page  # a corpus recipe's own key


def test_readme_is_short_and_keeps_the_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert TEST_COMMAND in readme.splitlines()


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    # NO_MKDOCS_2_WARNING: mkdocs-material >= 9.7 prints an end-of-life banner otherwise
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "reference" / "recipe-keys" / "index.html").is_file()
